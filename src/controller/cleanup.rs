//! The finalizer's clean-up, in every region of interest: with `Delete`,
//! deregister every owned image and delete every owned snapshot; with
//! `Retain`, leave them in place without the ownership tags, so that nothing
//! of the operator's can delete them later. The finalizer goes only when
//! that succeeded. An image listed by this object's tag that is not its own
//! (see `plan::ownership`) is left untouched.

use std::collections::{BTreeMap, BTreeSet};

use futures::future;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;
use tracing::{info, warn};

use super::act::{claim_snapshots, ownership_keys, snapshots_of, tag_untagged_copy};
use super::reconcile::meta;
use super::{Context, object_ref, publish, report};
use crate::api::{AmiCopy, DeletionPolicy, TargetState, TargetStatus};
use crate::ec2::{Ec2, ImageInfo, Scope};
use crate::error::{Error, Result};
use crate::plan::ownership::{self, Ownership};
use crate::plan::{self, Meta, Note, Scopes, generations};
use crate::status::{self, reason};

pub(super) async fn cleanup<E: Ec2>(
    cached: &AmiCopy,
    api: &Api<AmiCopy>,
    ctx: &Context<E>,
) -> Result<Requeue> {
    // The watch may not have brought the last status write yet, and what
    // the status names (a copy started a moment ago) is what the clean-up
    // must not miss: it reads the object fresh.
    let fresh = api
        .get_opt(&cached.name_any())
        .await
        .map_err(Error::Kube)?
        .filter(|o| o.metadata.uid == cached.metadata.uid);
    let obj = fresh.as_ref().unwrap_or(cached);
    let mut m = meta(obj, &ctx.config)?;
    m.governing = ctx.governing(&m.namespace);
    if let Some(t) = &ctx.tracker {
        t.forget(&object_ref(&m));
    }
    let source = obj
        .spec
        .source
        .effective_image_id(obj.status.as_ref())
        .unwrap_or_default();
    let tags = plan::desired_tags(&obj.spec, &m, source);
    let scopes = Scopes::new(&obj.spec, obj.status.as_ref()).on_behalf_of(&m.namespace, &m.name);
    let region = Region {
        obj,
        ctx,
        m: &m,
        tags: &tags,
    };
    // Every region is cleaned at once and to the end of what it can do, so
    // that a fault in one region neither delays nor undoes the others.
    let places = places(obj, &scopes, &m);
    let results = future::join_all(places.into_iter().map(|scope| {
        let region = &region;
        async move {
            let res = region.clean(&scope.region, &scope).await;
            (scope.to_string(), res)
        }
    }))
    .await;
    let mut first = None;
    let mut blocked = Vec::new();
    for (region, res) in results {
        if let Err(e) = res {
            warn!(%region, error = %e, "clean-up not finished in this region");
            if !e.is_passing() {
                blocked.push(format!("{region}: {e}"));
            }
            first.get_or_insert(e);
        }
    }
    if obj.spec.deletion_policy == DeletionPolicy::Delete
        && let Err(e) = withdraw_parameters(obj, &m, ctx).await
    {
        warn!(error = %e, "published SSM parameters not withdrawn yet");
        if !e.is_passing() {
            blocked.push(format!("SSM parameters: {e}"));
        }
        first.get_or_insert(e);
    }
    if let Some(e) = first {
        if !blocked.is_empty() {
            report::cleanup_blocked(obj, api, ctx, &blocked.join("; ")).await;
        }
        return Err(e);
    }
    ctx.forget_object(&super::cached::key_of(obj));
    if obj.spec.deletion_policy == DeletionPolicy::Retain {
        let message =
            "deletionPolicy is Retain: target images are left in place, without the operator's tags"
                .into();
        ctx.publish(obj, &Note::normal(reason::RETAINED, "", message))
            .await;
        info!("all target images and snapshots released");
    } else {
        info!("all target images deregistered and snapshots deleted");
    }
    Ok(Requeue::await_change())
}

/// `Delete`: the SSM parameters the status says were published, while they
/// still hold a copy this object made.
async fn withdraw_parameters<E: Ec2>(obj: &AmiCopy, m: &Meta, ctx: &Context<E>) -> Result<()> {
    let Some(status) = obj.status.as_ref() else {
        return Ok(());
    };
    let Some(published) = &status.published else {
        return Ok(());
    };
    let ours = plan::publish::own_images(status);
    for param in &published.ssm_parameters {
        let scope = publish::recorded_scope(param, m);
        publish::withdraw(&ctx.ec2, &scope, &param.name, &ours).await?;
    }
    Ok(())
}

/// Every region of interest, in the account it is reached in now, and in
/// any other account the status recorded copies in (a destination whose
/// `roleArn` changed).
///
/// A role the policies refuse is not assumed for its destination: only the
/// roles the status recorded copies through are, for they were allowed then.
fn places(obj: &AmiCopy, scopes: &Scopes, m: &Meta) -> BTreeSet<Scope> {
    let refused_roles: BTreeSet<String> = m
        .governing
        .iter()
        .flat_map(|g| g.check(&obj.spec, None))
        .filter(|d| d.rule.starts_with("roles"))
        .filter_map(|d| d.region)
        .collect();
    let mut places: BTreeSet<Scope> = plan::regions_of_interest(&obj.spec, obj.status.as_ref())
        .iter()
        .map(|r| scopes.of(r))
        .filter(|s| s.role.is_none() || !refused_roles.contains(&s.region))
        .collect();
    for t in obj.status.iter().flat_map(|s| s.targets()) {
        let scope = Scope::through(&t.region, t.role_arn.as_deref(), t.external_id.as_deref());
        places.insert(scope.on_behalf_of(&m.namespace, &m.name));
    }
    places
}

/// What the clean-up of each region needs.
struct Region<'a, E> {
    obj: &'a AmiCopy,
    ctx: &'a Context<E>,
    m: &'a Meta,
    tags: &'a BTreeMap<String, String>,
}

impl<E: Ec2> Region<'_, E> {
    /// Deregisters (or releases) this object's images in one region and
    /// deletes (or releases) their snapshots; an error once the region is
    /// known to still hold some.
    async fn clean(&self, region: &str, scope: &Scope) -> Result<()> {
        let ec2 = &self.ctx.ec2;
        let uid = &self.m.uid;
        let listed = match ec2.owned_images(scope, uid).await {
            // A region that does not exist for this account holds nothing of
            // ours unless the status says a copy was made there.
            Err(e) if status::region_refused(&e) && !self.copied_to(region) => {
                warn!(%region, error = %e, "region refused; nothing was copied there, nothing to clean up");
                return Ok(());
            }
            res => res?,
        };
        let (listed, mut unseen) = self.with_recorded(region, scope, listed).await?;
        let mut unlisted_snapshots = Vec::new();
        for image in self.own(region, listed).await {
            unlisted_snapshots.extend(self.clean_image(region, scope, &image).await?);
        }
        let snapshots: Vec<String> = ec2
            .owned_snapshots(scope, uid)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        match self.obj.spec.deletion_policy {
            DeletionPolicy::Delete => {
                for snap in &snapshots {
                    ec2.delete_snapshot(scope, snap).await?;
                }
            }
            DeletionPolicy::Retain if !snapshots.is_empty() => {
                ec2.delete_tags(scope, &snapshots, &ownership_keys())
                    .await?;
            }
            DeletionPolicy::Retain => {}
        }
        let left = ec2.owned_images(scope, uid).await?;
        let left: Vec<&str> = left
            .iter()
            .filter(|i| ownership::check(Some(i), uid) == Ownership::Ours)
            .map(|i| i.id.as_str())
            .collect();
        if !left.is_empty() {
            return Err(Error::CleanupPending {
                region: region.to_owned(),
                what: format!("images still listed: {}", left.join(", ")),
            });
        }
        if !unlisted_snapshots.is_empty() {
            let what = format!("snapshots {}", unlisted_snapshots.join(", "));
            unseen.get_or_insert(what);
        }
        match unseen {
            Some(image) => Err(Error::Unconfirmed {
                region: region.to_owned(),
                image,
            }),
            None => Ok(()),
        }
    }

    /// The listing, and the images the status recorded in `region` that it
    /// does not show, each read fresh by ID (EC2 lists new images, and their
    /// tags, with a delay). A copy recorded as pending that EC2 does not
    /// return while the deletion is younger than the listing grace is looked
    /// for again (the second value), not taken as gone.
    async fn with_recorded(
        &self,
        region: &str,
        scope: &Scope,
        mut listed: Vec<ImageInfo>,
    ) -> Result<(Vec<ImageInfo>, Option<String>)> {
        let targets: Vec<&TargetStatus> = self
            .obj
            .status
            .iter()
            .flat_map(|s| s.targets())
            .filter(|t| t.region == region)
            .collect();
        let mut unseen = None;
        for t in &targets {
            let Some(id) = t.image_id.as_deref() else {
                continue;
            };
            if listed.iter().any(|i| i.id == id) {
                continue;
            }
            match self.ctx.ec2.owned_image(scope, id).await? {
                Some(mut image) => {
                    // A copy the peer left untagged is tagged first, so
                    // that the checks and the sweep below find it as any
                    // other.
                    if let Some(src) = t.source_image_id.as_deref() {
                        let spec = (&self.obj.spec, self.m);
                        tag_untagged_copy(&self.ctx.ec2, spec, scope, &mut image, src).await?;
                    }
                    listed.push(image);
                }
                // A copy started just before the deletion may not be listed
                // yet; one that was available was listed long ago.
                None if t.state == TargetState::Pending && self.deletion_is_recent() => {
                    unseen.get_or_insert_with(|| id.to_owned());
                }
                None => {}
            }
        }
        // A copy decided on whose image ID never came back (the operator
        // stopped in between) shows in the listing once EC2 lists it.
        let now = Time(Timestamp::now());
        let grace = self.ctx.config.listing_grace;
        let pending_decision = targets.iter().any(|t| {
            generations::may_have_started(t) && plan::recent(t.planned_at.as_deref(), &now, grace)
        });
        if pending_decision && listed.is_empty() {
            unseen.get_or_insert_with(|| "a copy that may have started".to_owned());
        }
        Ok((listed, unseen))
    }

    /// Whether the object was deleted less than the listing grace ago.
    fn deletion_is_recent(&self) -> bool {
        let Some(deleted) = &self.obj.metadata.deletion_timestamp else {
            return false;
        };
        let age = Timestamp::now().duration_since(deleted.0);
        age.unsigned_abs() < self.ctx.config.listing_grace
    }

    /// The listed images that are this object's own; an Event for each of
    /// the others.
    async fn own(&self, region: &str, listed: Vec<ImageInfo>) -> Vec<ImageInfo> {
        let mut own = Vec::with_capacity(listed.len());
        for image in listed {
            match ownership::check(Some(&image), &self.m.uid) {
                Ownership::Foreign(why) => {
                    let message = format!("{} in {region} is left untouched: {why}", image.id);
                    let note = Note::warning(reason::FOREIGN_IMAGE_IGNORED, region, message);
                    self.ctx.publish(self.obj, &note).await;
                }
                _ => own.push(image),
            }
        }
        own
    }

    /// Deregisters (or releases) one image; the snapshots of it EC2 does not
    /// list yet, which the sweep cannot find this time.
    async fn clean_image(
        &self,
        region: &str,
        scope: &Scope,
        image: &ImageInfo,
    ) -> Result<Vec<String>> {
        let ec2 = &self.ctx.ec2;
        // Claim this image's untagged snapshots first, so the sweep that
        // follows finds them even on peers that ignore TagSpecifications.
        let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
        claim_snapshots(ec2, scope, &image.id, &ids, self.tags).await?;
        let mut unseen = Vec::new();
        let note = match self.obj.spec.deletion_policy {
            DeletionPolicy::Delete => {
                let owned;
                (owned, unseen) = snapshots_of(ec2, &self.m.uid, scope, image).await?;
                if image.protected() {
                    ec2.set_deregistration_protection(scope, &image.id, false)
                        .await?;
                }
                ec2.deregister_image(scope, &image.id).await?;
                info!(%region, image = %image.id, snapshots = ?owned, "deregistered by the finalizer");
                for snap in &owned {
                    ec2.delete_snapshot(scope, snap).await?;
                }
                let message = format!("deregistered {} in {region}", image.id);
                Note::normal(reason::DEREGISTERED, region, message)
            }
            DeletionPolicy::Retain => {
                let ids = [image.id.clone()];
                ec2.delete_tags(scope, &ids, &ownership_keys()).await?;
                let message = format!("{} in {region} is retained and no longer managed", image.id);
                Note::normal(reason::RETAINED, region, message)
            }
        };
        self.ctx.publish(self.obj, &note).await;
        Ok(unseen)
    }

    /// Whether the status records a copy made in `region`.
    fn copied_to(&self, region: &str) -> bool {
        self.obj.status.as_ref().is_some_and(|s| {
            s.destinations
                .iter()
                .chain(&s.retiring)
                .any(|t| t.region == region && t.image_id.is_some())
        })
    }
}
