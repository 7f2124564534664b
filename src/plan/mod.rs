//! The pure decision logic: from the spec, the last status and what EC2
//! reports, the next actions and the status they lead to ([`plan`]); then,
//! from what the actions did, the status to write ([`record`]). No client,
//! no I/O.
//!
//! - [`source`]: whether the source can be copied at all;
//! - [`destinations`]: each destination's current copy, or the copy to start;
//! - [`generations`]: older copies, kept or retired;
//! - [`upkeep`]: tags, sharing and deprecation of a copy that exists;
//! - [`naming`]: names, tags and idempotency tokens of new copies;
//! - [`scopes`]: which account and role each region is reached through;
//! - [`record`]: the actions' outcomes folded into the status, conditions;
//! - [`requeue`]: when to look at the object again.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{AmiCopySpec, AmiCopyStatus, RESERVED_TAG_PREFIX, ResolvedSource, TargetStatus};
use crate::ec2::{CopyRequest, Ec2Error, ErrorKind, Grant, ImageInfo, Scope};
use crate::policy;
use crate::status::reason;

pub mod destinations;
pub mod generations;
pub mod moved;
pub mod naming;
pub mod ownership;
pub mod publish;
pub mod record;
pub mod requeue;
pub mod scopes;
pub mod source;
pub mod upkeep;

pub use naming::{TokenInputs, client_token, desired_tags, target_name};
pub use record::{Copied, CopyFailure, Outcome, Recorded, Retirement, record};
pub use scopes::Scopes;

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
    /// How long EC2 may take to list a new copy (and its tags).
    pub listing_grace: std::time::Duration,
    /// The AmiCopyPolicies that govern the object's namespace (the default
    /// policy when none selects it).
    pub governing: Vec<crate::policy::Governing>,
    /// Where SSM parameters may be published: `<prefix><namespace>/`.
    pub ssm_prefix: String,
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
    /// The operator's own account, when a policy needed it and STS said.
    pub own_account: Option<String>,
    /// Copies that carried this object's tags when first seen, before the
    /// operator tagged anything: EC2 applied the tags of CopyImage, to the
    /// snapshots too, so these need no claim.
    pub tagged_by_ec2: BTreeSet<String>,
}

impl Observed {
    /// The first error worth retrying with backoff: throttling, 5xx,
    /// timeouts, and missing credentials (which may come back).
    pub fn transient_error(&self) -> Option<&Ec2Error> {
        let source = match &self.source {
            Some(Err(e)) => Some(e),
            _ => None,
        };
        source
            .into_iter()
            .chain(self.unreachable.values())
            .find(|e| e.is_transient() || e.kind == ErrorKind::Credentials)
    }
}

/// One side effect for the reconciler to perform. Each names its region;
/// the reconciler reaches it through the object's [`Scopes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a copy into `region`, the current copy of that destination.
    Copy {
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
    /// createVolumePermission) to what the spec wants.
    Share(Sharing),
    /// Deprecate an available copy at `at` (RFC 3339).
    Deprecate {
        region: String,
        image_id: String,
        at: String,
    },
    /// Retire an owned image: deregister it and delete its owned
    /// snapshots, or disable it, unless something uses it.
    Retire {
        region: String,
        image: ImageInfo,
        how: Retiring,
    },
    /// Turn on deregistration protection of a current copy.
    Protect { region: String, image_id: String },
    /// Publish the current copies' IDs (or withdraw what no longer is).
    Publish(Box<publish::Publication>),
    /// Delete the snapshots a deregistered copy left behind.
    DeleteSnapshots {
        region: String,
        image_id: String,
        snapshot_ids: Vec<String>,
    },
    /// `Retain`: leave an image in place, remove the ownership tags.
    Release { region: String, image: ImageInfo },
    /// Retire (or with `release`, release) a copy left in the account a
    /// destination was reached in before its `roleArn` changed, through
    /// `scope`; `snapshot_ids` are those the status names.
    RetireMoved {
        scope: Scope,
        image_id: String,
        snapshot_ids: Vec<String>,
        release: bool,
        /// Started less than the listing grace ago: not being returned may
        /// mean not listed yet.
        young: bool,
    },
}

impl Action {
    /// The region the action is about.
    pub fn region(&self) -> &str {
        match self {
            Action::Copy { region, .. }
            | Action::TagImage { region, .. }
            | Action::Untag { region, .. }
            | Action::Share(Sharing { region, .. })
            | Action::Deprecate { region, .. }
            | Action::Retire { region, .. }
            | Action::DeleteSnapshots { region, .. }
            | Action::Release { region, .. }
            | Action::Protect { region, .. } => region,
            Action::RetireMoved { scope, .. } => &scope.region,
            Action::Publish(_) => "",
        }
    }
}

/// How an older copy is retired (`spec.retirement`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retiring {
    /// Disable it instead of deregistering it.
    pub disable: bool,
    /// Keep it while a launch template or an instance uses it.
    pub keep_in_use: bool,
    /// Also keep it if it was launched after this time (RFC 3339).
    pub launched_after: Option<String>,
}

/// A change of a copy's permissions, from what status says was applied to
/// `want`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharing {
    pub region: String,
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
    pub add: Vec<Grant>,
    pub remove: Vec<Grant>,
    pub want: Vec<Grant>,
}

/// Tag the snapshots of an owned copy that just turned available and lack
/// the ownership tags (peers that ignore TagSpecifications on copy). Claims
/// touch only snapshots of images already ours, so they all run at once,
/// before the actions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub region: String,
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
    pub tags: BTreeMap<String, String>,
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

impl Note {
    pub fn normal(reason: &'static str, region: &str, message: String) -> Self {
        Self {
            warning: false,
            reason,
            region: region.to_owned(),
            message,
        }
    }

    pub fn warning(reason: &'static str, region: &str, message: String) -> Self {
        Self {
            warning: true,
            ..Self::normal(reason, region, message)
        }
    }
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

/// The planner's answer: what to do, and the status that leads to before
/// the actions' outcomes are known (conditions not yet summarized).
#[derive(Clone, Debug)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub claims: Vec<Claim>,
    pub status: AmiCopyStatus,
    pub notes: Vec<Note>,
    /// A problem of the whole object (the source), not of one destination.
    pub global: Option<(&'static str, String)>,
}

/// What every stage of one plan reads.
pub struct Input<'a> {
    pub spec: &'a AmiCopySpec,
    /// Destinations the policies refuse, by region, and why.
    pub blocked: &'a BTreeMap<String, String>,
    pub meta: &'a Meta,
    pub prev: &'a AmiCopyStatus,
    pub observed: &'a Observed,
    pub now: &'a Time,
    /// The source the copies are made from now; empty when a selector
    /// matched nothing.
    pub source_id: &'a str,
    /// Tags of the copies of the current source.
    pub tags: BTreeMap<String, String>,
    /// Per region, the images this object owns: `Observed::owned` less those
    /// [`ownership::check`] finds are not its own.
    pub owned: BTreeMap<&'a str, Vec<&'a ImageInfo>>,
    /// Snapshots of the source image: never claimed, tagged or shared.
    pub source_snapshots: BTreeSet<&'a str>,
    /// Keys the last status applied that `spec.tags` no longer lists.
    pub removed_tags: Vec<String>,
}

impl<'a> Input<'a> {
    /// The last status entry for an image, wherever it was listed.
    pub fn last_entry(&self, image_id: &str) -> Option<&'a TargetStatus> {
        self.prev
            .targets()
            .find(|t| t.image_id.as_deref() == Some(image_id))
    }
}

/// What the stages add up as they go.
#[derive(Default)]
pub struct Draft {
    pub actions: Vec<Action>,
    pub claims: Vec<Claim>,
    pub notes: Vec<Note>,
}

/// Decides what to do next. `now` dates deprecations.
pub fn plan(
    spec: &AmiCopySpec,
    meta: &Meta,
    previous: Option<&AmiCopyStatus>,
    observed: &Observed,
    now: &Time,
) -> Plan {
    let empty = AmiCopyStatus::default();
    let (prev, moved) = moved::split(spec, previous.unwrap_or(&empty));
    let prev = &prev;
    let source_id = match (&spec.source.image_id, &observed.resolved) {
        (Some(id), _) => id.as_str(),
        (None, Some(r)) => r.image_id.as_str(),
        (None, None) => "",
    };
    let source = match &observed.source {
        Some(Ok(Some(img))) => img
            .owner_id
            .as_deref()
            .map(|o| (o, img.owner_alias.as_deref())),
        _ => None,
    };
    let judged = policy::judge(
        &meta.governing,
        spec,
        source,
        observed.own_account.as_deref(),
    );
    // What the policies refuse of the sharing is not applied (and taken
    // away from the copies).
    let allowed = AmiCopySpec {
        sharing: judged.sharing.clone(),
        ..spec.clone()
    };
    let spec = &allowed;
    let mut verdict = source::assess(spec, meta, observed, source_id);
    if let Some(why) = &judged.global {
        verdict.image = None;
        verdict.problem = Some((reason::POLICY_DENIED, why.clone()));
    } else if let Some(why) = judged.message()
        && verdict.image.is_some()
    {
        verdict.problem = Some((reason::POLICY_DENIED, why));
    }
    let mut draft = Draft::default();
    if let Some(why) = judged.message() {
        draft
            .notes
            .push(Note::warning(reason::POLICY_DENIED, "", why));
    }
    let input = Input {
        spec,
        blocked: &judged.blocked,
        meta,
        prev,
        observed,
        now,
        source_id,
        tags: desired_tags(spec, meta, source_id),
        owned: verified(observed, &meta.uid, &mut draft.notes),
        source_snapshots: verdict
            .image
            .map(|s| s.snapshots.iter().map(|x| x.id.as_str()).collect())
            .unwrap_or_default(),
        removed_tags: prev
            .tag_keys
            .iter()
            // The operator's own keys stay whatever the status says.
            .filter(|k| !spec.tags.contains_key(*k) && !k.starts_with(RESERVED_TAG_PREFIX))
            .cloned()
            .collect(),
    };
    let destinations: Vec<TargetStatus> = spec
        .destinations
        .iter()
        .map(|dest| destinations::plan(&input, &verdict, dest, &mut draft))
        .collect();
    let (retiring, generations) = generations::plan(&input, &destinations, &mut draft);
    let held: BTreeSet<&str> = input
        .owned
        .values()
        .flatten()
        .map(|i| i.id.as_str())
        .chain(
            destinations
                .iter()
                .chain(&generations)
                .filter_map(|t| t.image_id.as_deref()),
        )
        .collect();
    let moved = moved::retire(&input, moved, &held, &mut draft);
    let published = match publish::plan(&input, &destinations) {
        Ok(publication) => {
            draft
                .actions
                .extend(publication.map(|p| Action::Publish(Box::new(p))));
            prev.published.clone()
        }
        Err(why) => {
            verdict.problem.get_or_insert((reason::PUBLISH_DENIED, why));
            prev.published.clone()
        }
    };
    let mut status = AmiCopyStatus {
        observed_generation: meta.generation,
        source_image_id: (!source_id.is_empty()).then(|| source_id.into()),
        resolved_source: observed.resolved.clone(),
        available: None,
        destinations,
        retiring,
        generations,
        tag_keys: spec.tags.keys().cloned().collect(),
        published,
        conditions: Vec::new(),
    };
    let scopes = Scopes::new(spec, previous);
    // A destination the policies refuse keeps the role its copy was made
    // through, if any: the one in the spec is not used, nor recorded.
    let refused = |t: &TargetStatus| judged.blocked.contains_key(&t.region);
    for t in status.targets_mut().filter(|t| !refused(t)) {
        scopes.record(t);
    }
    // Recorded after the others: each keeps the role it is reached through.
    status.retiring.extend(moved);
    Plan {
        actions: draft.actions,
        claims: draft.claims,
        status,
        notes: draft.notes,
        global: verdict.problem,
    }
}

/// The listed images that are this object's own; a note for each of the
/// others, which are never touched.
fn verified<'a>(
    observed: &'a Observed,
    uid: &str,
    notes: &mut Vec<Note>,
) -> BTreeMap<&'a str, Vec<&'a ImageInfo>> {
    let mut owned: BTreeMap<&str, Vec<&ImageInfo>> = BTreeMap::new();
    for (region, images) in &observed.owned {
        let mine = owned.entry(region.as_str()).or_default();
        for img in images {
            match ownership::check(Some(img), uid) {
                ownership::Ownership::Foreign(why) => notes.push(Note::warning(
                    reason::FOREIGN_IMAGE_IGNORED,
                    region,
                    format!("{} in {region} is left untouched: {why}", img.id),
                )),
                _ => mine.push(img),
            }
        }
    }
    owned
}

/// Whether `at` (RFC 3339, to the second) is less than `window` before `now`.
pub fn recent(at: Option<&str>, now: &Time, window: std::time::Duration) -> bool {
    let Some(at) = at.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok()) else {
        return false;
    };
    // The status keeps times to the second, cut down: a time read back may
    // be up to a second early, and "recent" errs on the side of looking
    // again.
    let window = window + std::time::Duration::from_secs(1);
    now.0.duration_since(at).unsigned_abs() < window
}

/// Regions where this object may own images: listed now, or named in status.
pub fn regions_of_interest(
    spec: &AmiCopySpec,
    previous: Option<&AmiCopyStatus>,
) -> BTreeSet<String> {
    let mut regions: BTreeSet<String> =
        spec.destinations.iter().map(|d| d.region.clone()).collect();
    if let Some(p) = previous {
        regions.extend(p.targets().map(|d| d.region.clone()));
    }
    regions
}

/// Regions whose images are listed by tag: those the last status names a
/// copy in (current, retiring or kept, started or only planned). Every
/// CopyImage is preceded by a status write that names it, so in a region the
/// status names nothing this object has started nothing, and listing it
/// would find nothing: a new object, or a destination just added, starts
/// without that call.
pub fn regions_to_list(previous: Option<&AmiCopyStatus>) -> BTreeSet<String> {
    previous
        .iter()
        .flat_map(|p| p.targets())
        .map(|t| t.region.clone())
        .collect()
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
