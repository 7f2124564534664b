//! Observe: what EC2 holds for one object, from the tracker's cache when it
//! knows every target the status names, else by asking EC2 (and tracking
//! what it says).

use std::collections::{BTreeMap, BTreeSet};

use futures::future;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tracing::warn;

use super::{Context, act, object_ref};
use crate::api::{AmiCopy, ResolvedSource, TargetState};
use crate::ec2::{Ec2, Ec2Error, ImageInfo, ImageQuery};
use crate::error::Result;
use crate::plan::{self, Meta, Observed, Scopes};
use crate::policy::{self, Governing};
use crate::status::reason;
use crate::tracker::{Known, Tracker};

pub(super) async fn observe<E: Ec2>(
    obj: &AmiCopy,
    m: &Meta,
    scopes: &Scopes,
    ctx: &Context<E>,
) -> Result<Observed> {
    let spec = &obj.spec;
    let tracker = ctx.tracker.as_ref();
    let resolved = match &spec.source.selector {
        Some(_) if spec.source.image_id.is_none() => resolve_source(obj, m, ctx).await?,
        _ => None,
    };
    let source_id = spec
        .source
        .image_id
        .as_deref()
        .or(resolved.as_ref().map(|r| r.image_id.as_str()));
    let source = match source_id {
        Some(id) => {
            let reader = tracker.map(|t| (t, object_ref(m)));
            observe_source(&spec.source.region, id, &ctx.ec2, reader).await
        }
        None => Ok(None),
    };
    let own_account = if m.governing.iter().any(Governing::needs_own_account) {
        ctx.ec2.own_account().await
    } else {
        None
    };
    // A destination the policies refuse is not looked at either: its role
    // may be one the operator must not assume.
    let blocked = policy::judge(&m.governing, spec, None, own_account.as_deref()).blocked;
    let cached = tracker.and_then(|t| from_cache(obj, m, source_id?, scopes, t));
    let (mut owned, mut recorded, unreachable, tagged_by_ec2) = match cached {
        Some(found) => (
            found.owned,
            found.recorded,
            BTreeMap::new(),
            found.tagged_by_ec2,
        ),
        None => {
            let (owned, unreachable) = list_owned(obj, m, scopes, &blocked, ctx).await;
            let recorded = look_up_recorded(obj, &owned, scopes, &blocked, &ctx.ec2).await?;
            if let Some(t) = tracker {
                let key = object_ref(m);
                for (region, images) in &owned {
                    let scope = scopes.of(region);
                    for img in images {
                        t.track(&key, &scope, img.clone(), &spec.source.region);
                    }
                }
            }
            (owned, recorded, unreachable, BTreeSet::new())
        }
    };
    tag_untagged(obj, m, scopes, (&mut owned, &mut recorded), ctx).await?;
    Ok(set_aside(
        Observed {
            source: Some(source),
            owned,
            recorded,
            unreachable,
            resolved,
            own_account,
            tagged_by_ec2,
        },
        &blocked,
    ))
}

/// Tags the copies this object started that EC2 shows without any owner's
/// tags (peers that ignore TagSpecifications on CopyImage): the ID came
/// back from this object's own CopyImage, so the copy is its own. EC2, which
/// applies the tags with the copy, needs no call here. A tagged copy joins
/// the owned images; its snapshots are claimed once it is available.
async fn tag_untagged<E: Ec2>(
    obj: &AmiCopy,
    m: &Meta,
    scopes: &Scopes,
    (owned, recorded): (&mut Owned, &mut BTreeMap<String, Option<ImageInfo>>),
    ctx: &Context<E>,
) -> Result<()> {
    let Some(prev) = obj.status.as_ref() else {
        return Ok(());
    };
    for entry in &prev.destinations {
        let (Some(id), Some(source)) = (&entry.image_id, &entry.source_image_id) else {
            continue;
        };
        let Some(Some(img)) = recorded.get_mut(id) else {
            continue;
        };
        let scope = scopes.of(&entry.region);
        let spec = (&obj.spec, m);
        if !act::tag_untagged_copy(&ctx.ec2, spec, &scope, img, source).await? {
            continue;
        }
        let Some(Some(img)) = recorded.remove(id) else {
            continue;
        };
        if let Some(t) = &ctx.tracker {
            t.track(&object_ref(m), &scope, img.clone(), &obj.spec.source.region);
            t.mark_tagged(&scope, id);
        }
        owned.entry(entry.region.clone()).or_default().push(img);
    }
    Ok(())
}

/// The regions the policies refuse, as if EC2 had not answered there: what
/// the status holds of them is kept, and nothing is done there.
fn set_aside(mut observed: Observed, blocked: &BTreeMap<String, String>) -> Observed {
    for (region, why) in blocked {
        observed.owned.remove(region);
        observed.unreachable.insert(
            region.clone(),
            Ec2Error::new(reason::POLICY_DENIED, why.clone()),
        );
    }
    observed
}

type Owned = BTreeMap<String, Vec<ImageInfo>>;

/// The object's images in every region of interest, by its UID tag. A region
/// EC2 cannot be asked about is reported on its destination; the others go
/// on.
async fn list_owned<E: Ec2>(
    obj: &AmiCopy,
    m: &Meta,
    scopes: &Scopes,
    blocked: &BTreeMap<String, String>,
    ctx: &Context<E>,
) -> (Owned, BTreeMap<String, Ec2Error>) {
    let mut regions = plan::regions_to_list(obj.status.as_ref());
    regions.retain(|r| !blocked.contains_key(r));
    let listed = future::join_all(regions.into_iter().map(|r| async move {
        let res = ctx.ec2.owned_images(&scopes.of(&r), &m.uid).await;
        (r, res)
    }))
    .await;
    let mut owned = BTreeMap::new();
    let mut unreachable = BTreeMap::new();
    for (region, res) in listed {
        match res {
            Ok(images) => {
                owned.insert(region, images);
            }
            Err(e) => {
                warn!(%region, error = %e, "cannot list this object's images in the region");
                unreachable.insert(region, e);
            }
        }
    }
    (owned, unreachable)
}

/// The images the last status names that the listing did not return, by ID.
async fn look_up_recorded<E: Ec2>(
    obj: &AmiCopy,
    owned: &Owned,
    scopes: &Scopes,
    blocked: &BTreeMap<String, String>,
    ec2: &E,
) -> Result<BTreeMap<String, Option<ImageInfo>>> {
    let mut to_check = plan::recorded_to_check(obj.status.as_ref(), owned);
    to_check.retain(|(r, _)| !blocked.contains_key(r));
    let found = future::try_join_all(to_check.into_iter().map(|(r, id)| async move {
        let img = ec2.describe_image(&scopes.of(&r), &id).await?;
        Ok::<_, Ec2Error>((id, img))
    }))
    .await?;
    Ok(found.into_iter().collect())
}

/// The most recent available image matching `spec.source.selector`: the one
/// the last status recorded while that is fresh, else asked of EC2.
async fn resolve_source<E: Ec2>(
    obj: &AmiCopy,
    m: &Meta,
    ctx: &Context<E>,
) -> Result<Option<ResolvedSource>> {
    let Some(selector) = &obj.spec.source.selector else {
        return Ok(None);
    };
    let now = Timestamp::now();
    let last = obj
        .status
        .as_ref()
        .filter(|s| s.observed_generation == m.generation)
        .and_then(|s| s.resolved_source.clone());
    if let Some(last) = last {
        let fresh = last.resolved_at.parse::<Timestamp>().is_ok_and(|at| {
            now.duration_since(at).unsigned_abs() < ctx.config.source_refresh_interval
        });
        if fresh {
            return Ok(Some(last));
        }
    }
    let query = ImageQuery {
        owners: selector.owners.clone(),
        name: selector.name.clone(),
        tags: selector.tags.clone().unwrap_or_default(),
    };
    let region = crate::ec2::Scope::region(obj.spec.source.region.as_str());
    let images = ctx.ec2.find_images(&region, &query).await?;
    // Newest first; EC2's creation dates sort as text.
    let newest = images
        .into_iter()
        .filter(|i| i.state == TargetState::Available)
        .max_by(|a, b| a.creation_date.cmp(&b.creation_date).then(a.id.cmp(&b.id)));
    Ok(newest.map(|img| ResolvedSource {
        image_id: img.id,
        name: img.name,
        resolved_at: plan::destinations::rfc3339(&Time(now)),
    }))
}

/// The source image; EC2's refusals (not found, access denied) become part
/// of the observation, transient errors end the reconcile.
async fn observe_source<E: Ec2>(
    region: &str,
    id: &str,
    ec2: &E,
    tracker: Option<(&Tracker, ObjectRef<AmiCopy>)>,
) -> std::result::Result<Option<ImageInfo>, Ec2Error> {
    if let Some(hit) = tracker.as_ref().and_then(|(t, _)| t.source(region, id)) {
        return Ok(hit);
    }
    match ec2
        .describe_image(&crate::ec2::Scope::region(region), id)
        .await
    {
        Ok(img) => {
            if let Some((t, reader)) = &tracker {
                t.remember_source(reader, region, id, img.clone());
            }
            Ok(img)
        }
        Err(e) => {
            warn!(%region, error = %e, "cannot read the source image");
            Err(e)
        }
    }
}

/// What the tracker knows of an object's targets.
struct Cached {
    owned: Owned,
    recorded: BTreeMap<String, Option<ImageInfo>>,
    /// Owned copies that carried their tags when the tracker first saw
    /// them: EC2 applied the tags with the copy, to its snapshots too.
    tagged_by_ec2: BTreeSet<String>,
}

/// The targets as the tracker knows them, if it knows every one the status
/// names and the spec has not changed since that status.
fn from_cache(
    obj: &AmiCopy,
    m: &Meta,
    source_id: &str,
    scopes: &Scopes,
    tracker: &Tracker,
) -> Option<Cached> {
    let prev = obj.status.as_ref()?;
    if prev.observed_generation != m.generation
        || prev.source_image_id.as_deref() != Some(source_id)
    {
        return None;
    }
    for d in &obj.spec.destinations {
        let t = prev.destinations.iter().find(|t| t.region == d.region)?;
        if t.image_id.is_none() && !t.state.is_unstarted() {
            return None;
        }
    }
    // The tracker knows images by ID: a copy that may have started without
    // its ID coming back is only found by listing its region.
    if prev.targets().any(plan::generations::may_have_started) {
        return None;
    }
    let mut owned: Owned = plan::regions_of_interest(&obj.spec, Some(prev))
        .into_iter()
        .map(|r| (r, Vec::new()))
        .collect();
    let mut recorded = BTreeMap::new();
    let mut tagged_by_ec2 = BTreeSet::new();
    for t in prev.targets() {
        let Some(id) = &t.image_id else { continue };
        let scope = scopes.of(&t.region);
        match tracker.lookup(&scope, id) {
            Known::Unknown => return None,
            Known::Image(Some(info)) if info.owned_by(&m.uid) => {
                if !tracker.tagged_by_operator(&scope, id) {
                    tagged_by_ec2.insert(id.clone());
                }
                owned.entry(t.region.clone()).or_default().push(info)
            }
            Known::Image(other) => {
                recorded.insert(id.clone(), other);
            }
        }
    }
    Some(Cached {
        owned,
        recorded,
        tagged_by_ec2,
    })
}
