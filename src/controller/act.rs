//! Act: the side effects of a plan. Each action returns a typed outcome
//! for `record` and never edits the status; an error is handed back to be
//! retried with backoff once the status is written.

use std::collections::BTreeMap;

use futures::future;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tracing::{info, warn};

use super::{Context, object_ref};
use crate::api::{AmiCopySpec, OWNER_TAG, SOURCE_TAG, TargetState, UID_TAG};
use crate::ec2::{CopyRequest, Ec2, Grant, ImageInfo, Permission, Scope};
use crate::error::{Error, Result};
use crate::plan::destinations::rfc3339;
use crate::plan::ownership::{self, Ownership};
use crate::plan::{
    Action, Claim, Copied, CopyFailure, Meta, Outcome, Plan, Retirement, Retiring, Scopes, Sharing,
};
use crate::usage::Users;

/// What the actions of one plan did, and the first error among them.
pub(super) struct Acted {
    pub outcomes: Vec<Outcome>,
    pub error: Option<Error>,
}

/// Runs the claims, all at once, then the actions in order. Every action
/// runs whatever the others did.
pub(super) async fn act<E: Ec2>(plan: &Plan, m: &Meta, scopes: &Scopes, ctx: &Context<E>) -> Acted {
    let claims = future::join_all(plan.claims.iter().map(|c| claim(c, scopes, &ctx.ec2))).await;
    let mut error = None;
    for res in claims {
        if let Err(e) = res {
            warn!(error = %e, "claiming snapshots failed; retrying later");
            error.get_or_insert(e);
        }
    }
    let users = users_by_region(plan, scopes, ctx).await;
    let pass = Pass {
        m,
        scopes,
        users: &users,
    };
    let mut outcomes = Vec::with_capacity(plan.actions.len());
    for action in &plan.actions {
        let scope = match action {
            Action::RetireMoved { scope, .. } => scope.clone().on_behalf_of(&m.namespace, &m.name),
            _ => scopes.of(action.region()),
        };
        let (outcome, failed) = perform(action, &pass, &scope, ctx).await;
        outcomes.push(outcome);
        if let Some(e) = failed {
            warn!(region = action.region(), error = %e, "action failed; retrying later");
            error.get_or_insert(e);
        }
    }
    Acted { outcomes, error }
}

/// What uses the copies this plan retires, per region: one look-up per
/// region for all of them, shared with the other objects retiring copies
/// there (`usage`), right before they are retired.
async fn users_by_region<E: Ec2>(
    plan: &Plan,
    scopes: &Scopes,
    ctx: &Context<E>,
) -> BTreeMap<String, Users> {
    let mut by_region: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for action in &plan.actions {
        if let Action::Retire { region, image, how } = action
            && how.keep_in_use
        {
            by_region.entry(region).or_default().push(image.id.clone());
        }
    }
    let lookups = by_region.into_iter().map(|(region, ids)| async move {
        let scope = scopes.of(region);
        let found = ctx
            .lookups
            .users(&ctx.ec2, &scope, &ids, crate::usage::WINDOW)
            .await;
        (region.to_owned(), found)
    });
    future::join_all(lookups).await.into_iter().collect()
}

/// Whether a copy may be retired now, and how.
pub(super) struct Check<'a> {
    pub how: &'a Retiring,
    /// What uses the copies of its region; `None` when not looked up.
    pub users: Option<&'a Users>,
}

impl Check<'_> {
    /// No look-up, deregister: the finalizer's and a moved copy's way.
    pub(super) const PLAIN: Check<'static> = Check {
        how: &Retiring {
            disable: false,
            keep_in_use: false,
            launched_after: None,
        },
        users: None,
    };

    /// What keeps `image` (read fresh) from being retired; an error when
    /// the look-up failed (nothing is retired on a guess).
    fn users_of(&self, image: &ImageInfo) -> Result<Vec<String>> {
        if !self.how.keep_in_use {
            return Ok(Vec::new());
        }
        let mut users = match self.users {
            Some(Ok(found)) => found.get(&image.id).cloned().unwrap_or_default(),
            Some(Err(e)) => return Err(e.clone().into()),
            None => Vec::new(),
        };
        let launched = image
            .last_launched_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        let after = self
            .how
            .launched_after
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        if let (Some(launched), Some(after)) = (launched, after)
            && launched >= after
        {
            users.push(format!("launched at {}", rfc3339(&Time(launched))));
        }
        Ok(users)
    }
}

async fn claim<E: Ec2>(c: &Claim, scopes: &Scopes, ec2: &E) -> Result<()> {
    let scope = scopes.of(&c.region);
    claim_snapshots(ec2, &scope, &c.image_id, &c.snapshot_ids, &c.tags).await
}

/// The outcome, or `Done` and the error.
fn finish(res: Result<()>, outcome: impl FnOnce() -> Outcome) -> (Outcome, Option<Error>) {
    match res {
        Ok(()) => (outcome(), None),
        Err(e) => (Outcome::Done, Some(e)),
    }
}

/// The outcome of a destructive call on an image read fresh just before:
/// done when it was this object's, an Event when it was someone else's, and
/// a retry when EC2 did not return it (never taken as gone).
fn verified(
    res: Result<Ownership>,
    region: &str,
    image_id: &str,
    done: impl FnOnce() -> Outcome,
) -> (Outcome, Option<Error>) {
    match res {
        Ok(Ownership::Ours) => (done(), None),
        Ok(Ownership::Unseen) => {
            let error = Error::Unconfirmed {
                region: region.to_owned(),
                image: image_id.to_owned(),
            };
            (Outcome::Done, Some(error))
        }
        Ok(Ownership::Foreign(why)) => {
            let (region, image_id) = (region.to_owned(), image_id.to_owned());
            let step = Retirement::Foreign { why };
            (
                Outcome::Retirement {
                    region,
                    image_id,
                    step,
                },
                None,
            )
        }
        Err(e) => (Outcome::Done, Some(e)),
    }
}

/// What the actions of one pass share.
struct Pass<'a> {
    m: &'a Meta,
    scopes: &'a Scopes,
    /// What uses the copies being retired, by region.
    users: &'a BTreeMap<String, Users>,
}

/// Performs one action in `scope` (the account its region is reached in).
async fn perform<E: Ec2>(
    action: &Action,
    pass: &Pass<'_>,
    scope: &Scope,
    ctx: &Context<E>,
) -> (Outcome, Option<Error>) {
    let ec2 = &ctx.ec2;
    let m = pass.m;
    match action {
        Action::Copy { region, request } => copy(region, request, m, scope, ctx).await,
        Action::TagImage {
            region,
            image_id,
            resource_ids,
            tags,
        } => {
            info!(%region, image = %image_id, "updating the tags of a target and its snapshots");
            let res = ec2.create_tags(scope, resource_ids, tags).await;
            finish(res.map_err(Error::from), || Outcome::Done)
        }
        Action::Untag {
            resource_ids, keys, ..
        } => {
            let res = ec2.delete_tags(scope, resource_ids, keys).await;
            finish(res.map_err(Error::from), || Outcome::Done)
        }
        Action::Share(change) => share_copy(change, &m.uid, scope, ec2).await,
        Action::Deprecate {
            region,
            image_id,
            at,
        } => {
            let res = ec2.deprecate_image(scope, image_id, at).await;
            finish(res.map_err(Error::from), || Outcome::Deprecated {
                region: region.clone(),
                image_id: image_id.clone(),
                at: at.clone(),
            })
        }
        Action::Retire { region, image, how } => {
            let check = Check {
                how,
                users: pass.users.get(region.as_str()),
            };
            retire_copy(region, image, &check, m, scope, ctx).await
        }
        Action::Protect { region, image_id } => {
            let res = ec2
                .set_deregistration_protection(scope, image_id, true)
                .await;
            finish(res.map_err(Error::from), || Outcome::Protected {
                region: region.clone(),
                image_id: image_id.clone(),
            })
        }
        Action::Publish(p) => super::publish::publish(p, m, pass.scopes, ctx).await,
        Action::DeleteSnapshots {
            region,
            image_id,
            snapshot_ids,
        } => delete_left(region, image_id, snapshot_ids, &m.uid, scope, ec2).await,
        Action::RetireMoved {
            image_id,
            snapshot_ids,
            release,
            young,
            ..
        } => {
            let left = Left {
                image_id,
                snapshot_ids,
                young: *young,
            };
            retire_moved(&left, *release, m, scope, ctx).await
        }
        Action::Release { region, image } => {
            let res = release(ec2, &m.uid, scope, &image.id).await;
            verified(res, region, &image.id, || {
                untrack(ctx, scope, &image.id);
                Outcome::Retirement {
                    region: region.clone(),
                    image_id: image.id.clone(),
                    step: Retirement::Released,
                }
            })
        }
    }
}

/// Brings a copy's permissions to what the spec wants.
/// Permissions are only taken away from an image a fresh read confirms as
/// this object's.
async fn share_copy<E: Ec2>(
    change: &Sharing,
    uid: &str,
    scope: &Scope,
    ec2: &E,
) -> (Outcome, Option<Error>) {
    if !change.remove.is_empty() {
        let verdict = verify(ec2, uid, scope, &change.image_id).await;
        let res = verdict.map(|(v, _)| v);
        if !matches!(res, Ok(Ownership::Ours)) {
            return verified(res, &change.region, &change.image_id, || Outcome::Done);
        }
    }
    let res = share(ec2, scope, change).await;
    finish(res, || Outcome::Shared(change.clone()))
}

/// Deletes the snapshots a deregistered copy left, those still this
/// object's; the ones that fail stay in the outcome.
async fn delete_left<E: Ec2>(
    region: &str,
    image_id: &str,
    snapshot_ids: &[String],
    uid: &str,
    scope: &Scope,
    ec2: &E,
) -> (Outcome, Option<Error>) {
    let sweep = match owned_snapshots_among(ec2, uid, scope, snapshot_ids).await {
        Ok(ours) => delete_snapshots(ec2, scope, ours).await,
        Err(e) => Sweep {
            left: snapshot_ids.to_vec(),
            error: Some(e),
        },
    };
    let outcome = Outcome::Retirement {
        region: region.to_owned(),
        image_id: image_id.to_owned(),
        step: Retirement::SnapshotsDeleted { left: sweep.left },
    };
    (outcome, sweep.error)
}

/// Retires a copy confirmed as this object's; the snapshots it could not
/// delete stay in the outcome. A copy with snapshots the status does not
/// name yet (EC2 listed it before they were known) is not deregistered in
/// this pass: the status names them first, so that they are still deleted
/// if the operator stops between the two.
async fn retire_copy<E: Ec2>(
    region: &str,
    image: &ImageInfo,
    check: &Check<'_>,
    m: &Meta,
    scope: &Scope,
    ctx: &Context<E>,
) -> (Outcome, Option<Error>) {
    let named: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
    let target = Target {
        uid: &m.uid,
        image_id: &image.id,
        named: &named,
    };
    let (res, step) = match retire(&ctx.ec2, scope, &target, check).await {
        Ok((verdict, Retired::Unnamed(snapshots))) => {
            (Ok(verdict), Ok(Retirement::Named { snapshots }))
        }
        Ok((verdict, Retired::InUse(users))) => (Ok(verdict), Ok(Retirement::InUse { users })),
        Ok((verdict, Retired::Disabled)) => (Ok(verdict), Ok(Retirement::Disabled)),
        Ok((verdict, Retired::Deregistered(sweep))) => (Ok(verdict), Err(sweep)),
        Err(e) => (Err(e), Err(Sweep::default())),
    };
    let (step, error) = match step {
        Ok(step) => (step, None),
        Err(sweep) => (
            Retirement::Retired {
                snapshots_left: sweep.left,
            },
            sweep.error,
        ),
    };
    let deregistered = matches!(step, Retirement::Retired { .. } | Retirement::Disabled);
    let (outcome, e) = verified(res, region, &image.id, || {
        if deregistered {
            untrack(ctx, scope, &image.id);
        }
        Outcome::Retirement {
            region: region.to_owned(),
            image_id: image.id.clone(),
            step,
        }
    });
    (outcome, e.or(error))
}

/// A copy in another account, as the status recorded it.
struct Left<'a> {
    image_id: &'a str,
    snapshot_ids: &'a [String],
    young: bool,
}

/// A copy left in the account its region was reached in before the
/// destination's `roleArn` changed, in that account (`scope`): retired (or
/// released) once a fresh read confirms it is this object's. When that
/// account no longer returns it, the snapshots the status names are deleted,
/// each checked for the object's UID tag: EC2 refuses to delete a snapshot
/// a registered image still uses.
async fn retire_moved<E: Ec2>(
    left: &Left<'_>,
    release_only: bool,
    m: &Meta,
    scope: &Scope,
    ctx: &Context<E>,
) -> (Outcome, Option<Error>) {
    let (image_id, snapshot_ids) = (left.image_id, left.snapshot_ids);
    let region = scope.region.as_str();
    let ec2 = &ctx.ec2;
    let seen = match verify(ec2, &m.uid, scope, image_id).await {
        Ok((verdict, _)) => verdict,
        Err(e) => return (Outcome::Done, Some(e)),
    };
    if seen == Ownership::Unseen && left.young {
        let error = Error::Unconfirmed {
            region: region.to_owned(),
            image: image_id.to_owned(),
        };
        return (Outcome::Done, Some(error));
    }
    if seen == Ownership::Unseen {
        return delete_left(region, image_id, snapshot_ids, &m.uid, scope, ec2).await;
    }
    let image = ImageInfo {
        id: image_id.to_owned(),
        snapshots: snapshot_ids
            .iter()
            .map(|id| crate::ec2::SnapshotRef {
                id: id.clone(),
                ..Default::default()
            })
            .collect(),
        ..ImageInfo::default()
    };
    if release_only {
        let res = release(ec2, &m.uid, scope, image_id).await;
        return verified(res, region, image_id, || Outcome::Retirement {
            region: region.to_owned(),
            image_id: image_id.to_owned(),
            step: Retirement::Released,
        });
    }
    retire_copy(region, &image, &Check::PLAIN, m, scope, ctx).await
}

/// Starts a copy once the tracker has a slot for it, tracks it, and tags it.
async fn copy<E: Ec2>(
    region: &str,
    request: &CopyRequest,
    m: &Meta,
    scope: &Scope,
    ctx: &Context<E>,
) -> (Outcome, Option<Error>) {
    let key = object_ref(m);
    let src_region = request.source_region.as_str();
    if let Some(t) = &ctx.tracker
        && let Err(queued) = t.admit(&key, scope, src_region)
    {
        let message = queued.message;
        let region = region.to_owned();
        let copy = Copied::Queued(message);
        return (Outcome::Copy { region, copy }, None);
    }
    let token = &request.client_token[..12.min(request.client_token.len())];
    info!(%region, source = %request.source_image_id, token, "starting a copy");
    match ctx.ec2.copy_image(scope, request).await {
        Ok(id) => {
            let at = Time(Timestamp::now());
            info!(%region, image = %id, token, "copy started");
            ctx.metrics.copy_started(region);
            if let Some(t) = &ctx.tracker {
                let placeholder = ImageInfo {
                    id: id.clone(),
                    state: TargetState::Pending,
                    tags: request.tags.clone(),
                    ..ImageInfo::default()
                };
                t.track_new(&key, scope, placeholder, src_region);
            }
            let started = Outcome::Copy {
                region: region.to_owned(),
                copy: Copied::Started {
                    image_id: id,
                    source_image_id: request.source_image_id.clone(),
                    at,
                },
            };
            (started, None)
        }
        Err(e) => {
            warn!(%region, token, error = %e, "CopyImage refused or unanswered");
            let failure = CopyFailure::of(&e);
            if let Some(t) = &ctx.tracker {
                t.release(scope, src_region);
                if failure == CopyFailure::Quota {
                    t.lower_limit(scope);
                }
            }
            let retry = failure.backs_off(ctx.tracker.is_some());
            let retry = retry.then(|| Error::from(e.clone()));
            let region = region.to_owned();
            let copy = Copied::Failed(e);
            (Outcome::Copy { region, copy }, retry)
        }
    }
}

/// Adds and removes an image's launch permissions and its snapshots'
/// createVolumePermission.
async fn share<E: Ec2>(ec2: &E, scope: &Scope, change: &Sharing) -> Result<()> {
    let (launch_add, volume_add) = split(&change.add);
    let (launch_remove, volume_remove) = split(&change.remove);
    let image_id = &change.image_id;
    if !launch_add.is_empty() || !launch_remove.is_empty() {
        ec2.set_launch_permissions(scope, image_id, &launch_add, &launch_remove)
            .await?;
    }
    if !volume_add.is_empty() || !volume_remove.is_empty() {
        for snap in &change.snapshot_ids {
            ec2.set_snapshot_permissions(scope, snap, &volume_add, &volume_remove)
                .await?;
        }
    }
    info!(region = %scope.region, image = %image_id, added = ?change.add, removed = ?change.remove, "launch permissions updated");
    Ok(())
}

/// Launch permissions, and the accounts given createVolumePermission.
fn split(grants: &[Grant]) -> (Vec<Permission>, Vec<String>) {
    let mut launch = Vec::new();
    let mut volume = Vec::new();
    for g in grants {
        match g {
            Grant::Launch(p) => launch.push(p.clone()),
            Grant::CreateVolume(account) => volume.push(account.clone()),
        }
    }
    (launch, volume)
}

/// A retired or released target leaves the tracker.
fn untrack<E>(ctx: &Context<E>, scope: &Scope, image_id: &str) {
    if let Some(t) = &ctx.tracker {
        t.untrack(scope, image_id);
    }
}

/// Tags those of an owned image's snapshots that carry no owner's UID tag yet
/// (peers that ignore TagSpecifications on copy); never re-tags another
/// owner's snapshot.
pub(super) async fn claim_snapshots<E: Ec2>(
    ec2: &E,
    scope: &Scope,
    image_id: &str,
    snapshot_ids: &[String],
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    let unclaimed: Vec<String> = ec2
        .describe_snapshots(scope, snapshot_ids)
        .await?
        .into_iter()
        .filter(|s| !s.tags.contains_key(UID_TAG))
        .map(|s| s.id)
        .collect();
    if !unclaimed.is_empty() {
        info!(region = %scope.region, image = %image_id, snapshots = ?unclaimed, "tagging the snapshots of a target image");
        ec2.create_tags(scope, &unclaimed, tags).await?;
    }
    Ok(())
}

/// Tags `image`, a copy the status recorded from this object's own
/// CopyImage (copied from `source`), when EC2 shows it with no owner's tags
/// (a peer that ignores the TagSpecifications of CopyImage); whether it did.
/// `image` then carries the tags.
pub(super) async fn tag_untagged_copy<E: Ec2>(
    ec2: &E,
    (spec, m): (&AmiCopySpec, &Meta),
    scope: &Scope,
    image: &mut ImageInfo,
    source: &str,
) -> Result<bool> {
    if !ownership::untagged_copy(image, source) {
        return Ok(false);
    }
    let tags = crate::plan::desired_tags(spec, m, source);
    ec2.create_tags(scope, std::slice::from_ref(&image.id), &tags)
        .await?;
    info!(region = %scope.region, image = %image.id, "tagged a copy the EC2 peer left untagged");
    image.tags.extend(tags);
    Ok(true)
}

/// Snapshots of `image` that carry this object's UID tag.
async fn owned_snapshot_ids<E: Ec2>(
    ec2: &E,
    uid: &str,
    scope: &Scope,
    image: &ImageInfo,
) -> Result<Vec<String>> {
    Ok(snapshots_of(ec2, uid, scope, image).await?.0)
}

/// The snapshots of `image` that carry this object's UID tag, and those EC2
/// did not return at all (new snapshots are listed late).
pub(super) async fn snapshots_of<E: Ec2>(
    ec2: &E,
    uid: &str,
    scope: &Scope,
    image: &ImageInfo,
) -> Result<(Vec<String>, Vec<String>)> {
    let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
    let found = ec2.describe_snapshots(scope, &ids).await?;
    let unseen = ids
        .iter()
        .filter(|id| !found.iter().any(|s| &s.id == *id))
        .cloned()
        .collect();
    let owned = found
        .into_iter()
        .filter(|s| s.tags.get(UID_TAG).map(String::as_str) == Some(uid))
        .map(|s| s.id)
        .collect();
    Ok((owned, unseen))
}

/// Those of `ids` that exist and carry this object's UID tag, read fresh.
async fn owned_snapshots_among<E: Ec2>(
    ec2: &E,
    uid: &str,
    scope: &Scope,
    ids: &[String],
) -> Result<Vec<String>> {
    Ok(ec2
        .describe_snapshots(scope, ids)
        .await?
        .into_iter()
        .filter(|s| s.tags.get(UID_TAG).map(String::as_str) == Some(uid))
        .map(|s| s.id)
        .collect())
}

/// What deleting some snapshots came to: those left, and the first error.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    pub left: Vec<String>,
    pub error: Option<Error>,
}

/// Deletes every snapshot it can; one failure does not stop the others.
async fn delete_snapshots<E: Ec2>(ec2: &E, scope: &Scope, ids: Vec<String>) -> Sweep {
    let mut sweep = Sweep::default();
    for id in ids {
        if let Err(e) = ec2.delete_snapshot(scope, &id).await {
            warn!(region = %scope.region, snapshot = %id, error = %e, "could not delete a snapshot; retrying later");
            sweep.error.get_or_insert(e.into());
            sweep.left.push(id);
        }
    }
    sweep
}

/// Reads an image fresh and judges whether it is this object's.
pub(super) async fn verify<E: Ec2>(
    ec2: &E,
    uid: &str,
    scope: &Scope,
    image_id: &str,
) -> Result<(Ownership, Option<ImageInfo>)> {
    let fresh = ec2.owned_image(scope, image_id).await?;
    Ok((ownership::check(fresh.as_ref(), uid), fresh))
}

/// What [`retire`] came to for an image confirmed as this object's.
#[derive(Debug)]
pub(super) enum Retired {
    /// Deregistered; the snapshots it could not delete are in the sweep.
    Deregistered(Sweep),
    /// Not deregistered: it has snapshots the status does not name yet;
    /// all of its snapshots, to be named first.
    Unnamed(Vec<String>),
    /// Not retired: something uses it.
    InUse(Vec<String>),
    /// Disabled; its snapshots stay.
    Disabled,
}

/// The image [`retire`] is asked to retire, for the object `uid`, whose
/// status names the snapshots `named`.
pub(super) struct Target<'a> {
    pub uid: &'a str,
    pub image_id: &'a str,
    pub named: &'a [String],
}

/// Retires an image once a fresh read shows that it is this object's, that
/// the status names (`target.named`) every snapshot it has, and that nothing
/// `check` looks for uses it: lifts its deregistration protection, then
/// disables it or deregisters it and deletes its owned snapshots. Otherwise
/// touches nothing.
pub(super) async fn retire<E: Ec2>(
    ec2: &E,
    scope: &Scope,
    target: &Target<'_>,
    check: &Check<'_>,
) -> Result<(Ownership, Retired)> {
    let (uid, image_id) = (target.uid, target.image_id);
    let (verdict, fresh) = verify(ec2, uid, scope, image_id).await?;
    let (Ownership::Ours, Some(image)) = (&verdict, fresh) else {
        warn!(region = %scope.region, image = %image_id, ?verdict, "not deregistering an image not confirmed as this object's");
        return Ok((verdict, Retired::Deregistered(Sweep::default())));
    };
    if image
        .snapshots
        .iter()
        .any(|s| !target.named.contains(&s.id))
    {
        let all = image.snapshots.iter().map(|s| s.id.clone()).collect();
        return Ok((verdict, Retired::Unnamed(all)));
    }
    let users = check.users_of(&image)?;
    if !users.is_empty() {
        info!(region = %scope.region, image = %image.id, ?users, "kept: in use");
        return Ok((verdict, Retired::InUse(users)));
    }
    if image.protected() {
        ec2.set_deregistration_protection(scope, &image.id, false)
            .await?;
    }
    if check.how.disable {
        ec2.disable_image(scope, &image.id).await?;
        info!(region = %scope.region, image = %image.id, "disabled");
        return Ok((verdict, Retired::Disabled));
    }
    let (snapshots, unseen) = snapshots_of(ec2, uid, scope, &image).await?;
    ec2.deregister_image(scope, &image.id).await?;
    info!(region = %scope.region, image = %image.id, snapshots = ?snapshots, "deregistered");
    let mut sweep = delete_snapshots(ec2, scope, snapshots).await;
    // Not listed yet: deleted later, once EC2 shows they are this object's.
    sweep.left.extend(unseen);
    Ok((verdict, Retired::Deregistered(sweep)))
}

/// `Retain`: once a fresh read shows the image is this object's, the image
/// and its owned snapshots lose the ownership tags, so that nothing of the
/// operator's can delete them later.
pub(super) async fn release<E: Ec2>(
    ec2: &E,
    uid: &str,
    scope: &Scope,
    image_id: &str,
) -> Result<Ownership> {
    let (verdict, fresh) = verify(ec2, uid, scope, image_id).await?;
    let (Ownership::Ours, Some(image)) = (&verdict, fresh) else {
        return Ok(verdict);
    };
    let mut ids = vec![image.id.clone()];
    ids.extend(owned_snapshot_ids(ec2, uid, scope, &image).await?);
    ec2.delete_tags(scope, &ids, &ownership_keys()).await?;
    Ok(verdict)
}

/// The tags that make an image or snapshot the operator's.
pub(super) fn ownership_keys() -> [String; 3] {
    [UID_TAG, OWNER_TAG, SOURCE_TAG].map(String::from)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ec2::fake::FakeEc2;
    use crate::ec2::{SnapshotInfo, SnapshotRef};

    const UID: &str = "uid-1";

    /// An image with `image_tags`, that EC2 says was copied from
    /// `copied_from`, and three snapshots: this object's, untagged, and
    /// another object's.
    fn world(image_tags: &[(&str, &str)], copied_from: Option<&str>) -> (FakeEc2, ImageInfo) {
        let ec2 = FakeEc2::default();
        let image = ImageInfo {
            id: "ami-00000000000000001".into(),
            state: TargetState::Available,
            snapshots: ["snap-ours", "snap-untagged", "snap-other-owner"]
                .into_iter()
                .map(|id| SnapshotRef {
                    id: id.into(),
                    ..SnapshotRef::default()
                })
                .collect(),
            tags: image_tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source_image_id: copied_from.map(str::to_owned),
            ..ImageInfo::default()
        };
        ec2.images
            .lock()
            .unwrap()
            .insert(("eu-west-1".into(), image.id.clone()), image.clone());
        for (id, uid) in [
            ("snap-ours", Some(UID)),
            ("snap-untagged", None),
            ("snap-other-owner", Some("uid-2")),
        ] {
            let tags = uid
                .map(|u| BTreeMap::from([(UID_TAG.to_string(), u.to_string())]))
                .unwrap_or_default();
            ec2.snapshots.lock().unwrap().insert(
                ("eu-west-1".into(), id.into()),
                SnapshotInfo {
                    id: id.into(),
                    tags,
                },
            );
        }
        (ec2, image)
    }

    #[tokio::test]
    async fn retire_deletes_only_what_carries_this_objects_uid() {
        const SRC: &str = "ami-00000000000000009";
        let (ec2, image) = world(&[(UID_TAG, UID), (SOURCE_TAG, SRC)], Some(SRC));
        let named: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
        let target = target(&image, &named);
        let (verdict, retired) = retire(&ec2, &Scope::region("eu-west-1"), &target, &Check::PLAIN)
            .await
            .unwrap();
        assert_eq!(verdict, Ownership::Ours);
        let Retired::Deregistered(sweep) = retired else {
            panic!("deregistered: {retired:?}")
        };
        assert!(sweep.left.is_empty() && sweep.error.is_none(), "{sweep:?}");
        assert!(
            ec2.images.lock().unwrap().is_empty(),
            "the owned image is deregistered"
        );
        let left: Vec<String> = ec2
            .snapshots
            .lock()
            .unwrap()
            .values()
            .map(|s| s.id.clone())
            .collect();
        assert_eq!(
            left,
            vec!["snap-other-owner".to_string(), "snap-untagged".to_string()]
        );
    }

    #[tokio::test]
    async fn retire_refuses_an_image_not_confirmed_as_this_objects() {
        const SRC: &str = "ami-00000000000000009";
        // The last: a copy of one of this object's copies, tags and all.
        for (tags, copied_from) in [
            (&[][..], None),
            (&[(UID_TAG, "uid-2")][..], None),
            (&[(UID_TAG, UID)][..], None),
            (
                &[(UID_TAG, UID), (SOURCE_TAG, SRC)][..],
                Some("ami-0000000000000000b"),
            ),
        ] {
            let (ec2, image) = world(tags, copied_from);
            let named: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
            let target = target(&image, &named);
            let (verdict, _) = retire(&ec2, &Scope::region("eu-west-1"), &target, &Check::PLAIN)
                .await
                .unwrap();
            assert_ne!(verdict, Ownership::Ours, "{tags:?}");
            assert!(
                ec2.calls.lock().unwrap().is_empty(),
                "no call at all: {:?}",
                ec2.calls.lock().unwrap()
            );
            assert_eq!(ec2.images.lock().unwrap().len(), 1);
            assert_eq!(ec2.snapshots.lock().unwrap().len(), 3);
        }
    }

    #[tokio::test]
    async fn a_copy_with_snapshots_the_status_does_not_name_is_not_deregistered_yet() {
        const SRC: &str = "ami-00000000000000009";
        let (ec2, image) = world(&[(UID_TAG, UID), (SOURCE_TAG, SRC)], Some(SRC));
        let all: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
        let target = target(&image, &[]);
        let (verdict, retired) = retire(&ec2, &Scope::region("eu-west-1"), &target, &Check::PLAIN)
            .await
            .unwrap();
        assert_eq!(verdict, Ownership::Ours);
        let Retired::Unnamed(snapshots) = retired else {
            panic!("not deregistered: {retired:?}")
        };
        assert_eq!(
            snapshots, all,
            "every snapshot of the copy, to be named first"
        );
        assert_eq!(ec2.images.lock().unwrap().len(), 1, "the image stays");
        assert_eq!(ec2.snapshots.lock().unwrap().len(), 3, "and its snapshots");
    }

    #[tokio::test]
    async fn permissions_are_only_removed_from_an_image_confirmed_as_this_objects() {
        let (ec2, image) = world(&[(UID_TAG, "uid-2")], None);
        let change = Sharing {
            region: "eu-west-1".into(),
            image_id: image.id.clone(),
            snapshot_ids: Vec::new(),
            add: Vec::new(),
            remove: vec![Grant::Launch(Permission::Account("111122223333".into()))],
            want: Vec::new(),
        };
        let (outcome, error) = share_copy(&change, UID, &Scope::region("eu-west-1"), &ec2).await;
        assert!(error.is_none(), "{error:?}");
        assert!(
            matches!(
                outcome,
                Outcome::Retirement {
                    step: Retirement::Foreign { .. },
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert!(
            ec2.calls.lock().unwrap().is_empty(),
            "no permission touched"
        );
    }

    fn target<'a>(image: &'a ImageInfo, named: &'a [String]) -> Target<'a> {
        Target {
            uid: UID,
            image_id: &image.id,
            named,
        }
    }

    #[tokio::test]
    async fn a_copy_in_use_or_launched_lately_is_kept_and_touched_not() {
        const SRC: &str = "ami-00000000000000009";
        let how = Retiring {
            disable: false,
            keep_in_use: true,
            launched_after: Some("2026-06-01T00:00:00Z".into()),
        };
        let scope = Scope::region("eu-west-1");
        // Used by a launch template.
        let (ec2, image) = world(&[(UID_TAG, UID), (SOURCE_TAG, SRC)], Some(SRC));
        let named: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
        let users = Ok(BTreeMap::from([(
            image.id.clone(),
            vec!["launch template lt-0123456789abcdef0 ($Default)".to_string()],
        )]));
        let check = Check {
            how: &how,
            users: Some(&users),
        };
        let (_, retired) = retire(&ec2, &scope, &target(&image, &named), &check)
            .await
            .unwrap();
        assert!(
            matches!(&retired, Retired::InUse(u) if u[0].starts_with("launch template")),
            "{retired:?}"
        );
        // Launched after the window's start.
        let (ec2, mut image) = world(&[(UID_TAG, UID), (SOURCE_TAG, SRC)], Some(SRC));
        image.last_launched_time = Some("2026-06-02T10:00:00Z".into());
        ec2.put("eu-west-1", image.clone());
        let none = Ok(BTreeMap::new());
        let check = Check {
            how: &how,
            users: Some(&none),
        };
        let (_, retired) = retire(&ec2, &scope, &target(&image, &named), &check)
            .await
            .unwrap();
        assert!(
            matches!(&retired, Retired::InUse(u) if u == &["launched at 2026-06-02T10:00:00Z"]),
            "{retired:?}"
        );
        assert_eq!(ec2.images.lock().unwrap().len(), 1, "the image stays");
        // The look-up failed: nothing is retired on a guess.
        let failed = Err(crate::ec2::Ec2Error::new(
            "RequestLimitExceeded",
            "slow down",
        ));
        let check = Check {
            how: &how,
            users: Some(&failed),
        };
        assert!(
            retire(&ec2, &scope, &target(&image, &named), &check)
                .await
                .is_err()
        );
        assert_eq!(ec2.images.lock().unwrap().len(), 1, "the image stays");
    }

    #[tokio::test]
    async fn protection_is_lifted_right_before_a_copy_is_disabled_or_deregistered() {
        const SRC: &str = "ami-00000000000000009";
        let scope = Scope::region("eu-west-1");
        for disable in [false, true] {
            let (ec2, mut image) = world(&[(UID_TAG, UID), (SOURCE_TAG, SRC)], Some(SRC));
            image.deregistration_protection = Some("enabled-without-cooldown".into());
            ec2.put("eu-west-1", image.clone());
            let named: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
            let how = Retiring {
                disable,
                ..Retiring::default()
            };
            let check = Check {
                how: &how,
                users: None,
            };
            let (_, retired) = retire(&ec2, &scope, &target(&image, &named), &check)
                .await
                .unwrap();
            let calls = ec2.calls.lock().unwrap().clone();
            assert!(
                calls[0]
                    .starts_with("DeregistrationProtection eu-west-1 ami-00000000000000001 false"),
                "{calls:?}"
            );
            if disable {
                assert!(matches!(retired, Retired::Disabled), "{retired:?}");
                assert!(calls[1].starts_with("DisableImage"), "{calls:?}");
                assert_eq!(ec2.snapshots.lock().unwrap().len(), 3, "snapshots stay");
            } else {
                assert!(matches!(retired, Retired::Deregistered(_)), "{retired:?}");
                assert!(ec2.images.lock().unwrap().is_empty());
            }
        }
    }
}
