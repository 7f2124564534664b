//! The finalizer's clean-up: with `Delete`, deregister every owned image and
//! delete every owned snapshot in every region of interest; the finalizer
//! goes only when that succeeded. With `Retain`, leave everything.

use std::collections::BTreeMap;

use futures::future;
use kube::runtime::controller::Action as Requeue;
use tracing::{info, warn};

use super::act::claim_snapshots;
use super::reconcile::meta;
use super::{Context, object_ref};
use crate::api::{AmiCopy, DeletionPolicy};
use crate::ec2::{Ec2, Scope};
use crate::error::{Error, Result};
use crate::plan::{self, Meta, Note, Scopes};
use crate::status::{self, reason};

pub(super) async fn cleanup<E: Ec2>(obj: &AmiCopy, ctx: &Context<E>) -> Result<Requeue> {
    let m = meta(obj, &ctx.config)?;
    if let Some(t) = &ctx.tracker {
        t.forget(&object_ref(&m));
    }
    if obj.spec.deletion_policy == DeletionPolicy::Retain {
        let message = "deletionPolicy is Retain: target images are left in place".into();
        ctx.publish(obj, &Note::normal(reason::RETAINED, "", message))
            .await;
        return Ok(Requeue::await_change());
    }
    let source = obj
        .spec
        .source
        .effective_image_id(obj.status.as_ref())
        .unwrap_or_default();
    let tags = plan::desired_tags(&obj.spec, &m, source);
    let scopes = Scopes::new(&obj.spec, obj.status.as_ref());
    let region = Region {
        obj,
        ctx,
        m: &m,
        tags: &tags,
    };
    // Every region is cleaned at once and to the end of what it can do, so
    // that a fault in one region neither delays nor undoes the others.
    let regions = plan::regions_of_interest(&obj.spec, obj.status.as_ref());
    let results = future::join_all(regions.into_iter().map(|name| {
        let scope = scopes.of(&name);
        let region = &region;
        async move {
            let res = region.clean(&name, &scope).await;
            (name, res)
        }
    }))
    .await;
    let mut first = None;
    for (region, res) in results {
        if let Err(e) = res {
            warn!(%region, error = %e, "clean-up not finished in this region");
            first.get_or_insert(e);
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    info!("all target images deregistered and snapshots deleted");
    Ok(Requeue::await_change())
}

/// What the clean-up of each region needs.
struct Region<'a, E> {
    obj: &'a AmiCopy,
    ctx: &'a Context<E>,
    m: &'a Meta,
    tags: &'a BTreeMap<String, String>,
}

impl<E: Ec2> Region<'_, E> {
    /// Deregisters this object's images in one region and deletes their
    /// snapshots; an error once the region is known to still hold some.
    async fn clean(&self, region: &str, scope: &Scope) -> Result<()> {
        let ec2 = &self.ctx.ec2;
        let uid = &self.m.uid;
        let images = match ec2.owned_images(scope, uid).await {
            // A region that does not exist for this account holds nothing of
            // ours unless the status says a copy was made there.
            Err(e) if status::region_refused(&e) && !self.copied_to(region) => {
                warn!(%region, error = %e, "region refused; nothing was copied there, nothing to clean up");
                return Ok(());
            }
            res => res?,
        };
        for image in images {
            // Claim this image's untagged snapshots first, so the sweep below
            // finds them even on peers that ignore TagSpecifications.
            let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
            claim_snapshots(ec2, scope, &image.id, &ids, self.tags).await?;
            ec2.deregister_image(scope, &image.id).await?;
            let message = format!("deregistered {} in {region}", image.id);
            let note = Note::normal(reason::DEREGISTERED, region, message);
            self.ctx.publish(self.obj, &note).await;
        }
        for snap in ec2.owned_snapshots(scope, uid).await? {
            ec2.delete_snapshot(scope, &snap.id).await?;
        }
        let left = ec2.owned_images(scope, uid).await?;
        if !left.is_empty() {
            let ids: Vec<&str> = left.iter().map(|i| i.id.as_str()).collect();
            return Err(Error::CleanupPending {
                region: region.to_owned(),
                what: format!("images still listed: {}", ids.join(", ")),
            });
        }
        Ok(())
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
