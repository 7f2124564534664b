//! The controller: observe → plan → act → report, behind kube-runtime's
//! finalizer helper.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use rand::Rng;
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::api::{
    AmiCopy, AmiCopyStatus, DeletionPolicy, FINALIZER, OWNER_TAG, SOURCE_TAG, UID_TAG,
};
use crate::ec2::{Ec2, Ec2Error, ErrorKind, ImageInfo};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::plan::{self, Action, Meta, Note, Observed};
use crate::status::{self, reason, state};

/// Field manager of the status written by server-side apply.
pub const FIELD_MANAGER: &str = "ami-copy-operator";

/// Timing of the control loop.
#[derive(Clone, Debug)]
pub struct Config {
    /// How soon to look again while copies are pending.
    pub poll_interval: Duration,
    /// How often to re-check settled objects (drift, out-of-band changes).
    pub resync_interval: Duration,
    /// First retry delay after a transient error; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(15),
            resync_interval: Duration::from_secs(600),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Shared state of every reconcile.
pub struct Context<E> {
    pub client: Client,
    pub ec2: E,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    failures: Mutex<HashMap<ObjectRef<AmiCopy>, u32>>,
}

impl<E: Ec2> Context<E> {
    pub fn new(client: Client, ec2: E, metrics: Arc<Metrics>, config: Config) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            ec2,
            metrics,
            config,
            failures: Mutex::default(),
        }
    }

    async fn publish(&self, obj: &AmiCopy, note: &Note) {
        let event = KubeEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.chars().take(1000).collect()),
            // Events with the same action and reason are merged into one
            // series; the region keeps each destination's story apart.
            action: if note.region.is_empty() {
                note.reason.into()
            } else {
                format!("{}/{}", note.reason, note.region)
            },
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, "could not publish an event");
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run<E: Ec2>(
    ctx: Arc<Context<E>>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<AmiCopy> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(e) = res {
                // One malformed object or failed reconcile never stops the others.
                warn!(error = %e, "reconcile failed");
            }
            future::ready(())
        })
        .await;
}

#[instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
async fn reconcile<E: Ec2>(obj: Arc<AmiCopy>, ctx: Arc<Context<E>>) -> Result<Requeue> {
    let start = Instant::now();
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<AmiCopy> = Api::namespaced(ctx.client.clone(), &ns);
    let key = ObjectRef::from_obj(obj.as_ref());
    let res = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) => apply(&obj, &api, &ctx).await,
            Finalizer::Cleanup(obj) => cleanup(&obj, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let outcome = match &res {
        Ok(_) => {
            ctx.failures.lock().expect("failures lock").remove(&key);
            "ok"
        }
        Err(e) => e.metric_label(),
    };
    ctx.metrics.reconciled(outcome, start.elapsed());
    res
}

/// Exponential backoff with jitter, per object; throttling starts higher.
fn error_policy<E: Ec2>(obj: Arc<AmiCopy>, err: &Error, ctx: Arc<Context<E>>) -> Requeue {
    let n = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let n = failures
            .entry(ObjectRef::from_obj(obj.as_ref()))
            .or_insert(0);
        *n += 1;
        *n
    };
    let delay = backoff(
        &ctx.config,
        n + u32::from(err.is_throttling()) * 2,
        rand::rng().random_range(0.5..1.5),
    );
    warn!(error = %err, category = err.metric_label(), retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

/// The `n`th retry delay (n ≥ 1), scaled by `jitter`.
pub fn backoff(config: &Config, n: u32, jitter: f64) -> Duration {
    let exp = config
        .min_backoff
        .saturating_mul(1u32 << n.saturating_sub(1).min(20));
    exp.min(config.max_backoff).mul_f64(jitter)
}

fn meta(obj: &AmiCopy) -> Result<Meta> {
    Ok(Meta {
        namespace: obj
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?,
        name: obj.name_any(),
        uid: obj.uid().ok_or(Error::MissingField("metadata.uid"))?,
        generation: obj.meta().generation,
    })
}

/// Errors worth retrying stop the reconcile; refusals become status.
fn retryable(e: Ec2Error) -> Result<Ec2Error> {
    match e.kind {
        ErrorKind::Throttled | ErrorKind::Transient => Err(e.into()),
        _ => Ok(e),
    }
}

async fn observe<E: Ec2>(obj: &AmiCopy, m: &Meta, ec2: &E) -> Result<Observed> {
    let spec = &obj.spec;
    let previous = obj.status.as_ref();
    let source = match ec2
        .describe_image(&spec.source.region, &spec.source.image_id)
        .await
    {
        Ok(img) => Ok(img),
        Err(e) => Err(retryable(e)?),
    };
    let regions = plan::regions_of_interest(spec, previous);
    let owned: BTreeMap<String, Vec<ImageInfo>> =
        future::try_join_all(regions.into_iter().map(|r| async move {
            let images = ec2.owned_images(&r, &m.uid).await?;
            Ok::<_, Ec2Error>((r, images))
        }))
        .await?
        .into_iter()
        .collect();
    let recorded = future::try_join_all(plan::recorded_to_check(previous, &owned).into_iter().map(
        |(r, id)| async move {
            let img = ec2.describe_image(&r, &id).await?;
            Ok::<_, Ec2Error>((id, img))
        },
    ))
    .await?
    .into_iter()
    .collect();
    Ok(Observed {
        source: Some(source),
        owned,
        recorded,
    })
}

async fn apply<E: Ec2>(obj: &AmiCopy, api: &Api<AmiCopy>, ctx: &Context<E>) -> Result<Requeue> {
    let m = meta(obj)?;
    let observed = observe(obj, &m, &ctx.ec2).await?;
    let now = Time(Timestamp::now());
    let mut plan = plan::plan(&obj.spec, &m, obj.status.as_ref(), &observed, &now);
    let mut deferred: Option<Error> = None;

    for action in std::mem::take(&mut plan.actions) {
        let res = act(&m, ctx, &mut plan, action).await;
        if let Err(e) = res {
            warn!(error = %e, "action failed; retrying later");
            deferred.get_or_insert(e);
        }
    }
    let prev_conditions = obj
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    plan.summarize(&prev_conditions, m.generation, &now);

    write_status(api, obj, &plan.status).await?;
    for note in &plan.notes {
        ctx.publish(obj, note).await;
    }
    if let Some(e) = deferred {
        return Err(e);
    }
    Ok(if plan.busy {
        Requeue::requeue(ctx.config.poll_interval)
    } else {
        Requeue::requeue(ctx.config.resync_interval)
    })
}

async fn act<E: Ec2>(
    m: &Meta,
    ctx: &Context<E>,
    plan: &mut plan::Plan,
    action: Action,
) -> Result<()> {
    let ec2 = &ctx.ec2;
    match action {
        Action::Copy {
            index,
            region,
            request,
        } => {
            let entry = &mut plan.status.destinations[index];
            match ec2.copy_image(&region, &request).await {
                Ok(id) => {
                    info!(%region, image = %id, "copy started");
                    ctx.metrics.copy_started(&region);
                    entry.image_id = Some(id.clone());
                    plan.notes.push(Note {
                        warning: false,
                        reason: "CopyStarted",
                        region: region.to_string(),
                        message: format!("copying {} to {region} as {id}", request.source_image_id),
                    });
                    // Some EC2 peers ignore TagSpecifications; the image ID
                    // just returned is certainly ours, so tag it explicitly.
                    ec2.create_tags(&region, std::slice::from_ref(&id), &request.tags)
                        .await?;
                }
                Err(e) => match e.kind {
                    ErrorKind::Throttled | ErrorKind::Transient => {
                        entry.state = state::WAITING.into();
                        entry.reason = Some(
                            if e.code == "ResourceLimitExceeded" {
                                reason::COPY_QUOTA
                            } else {
                                reason::WAITING
                            }
                            .into(),
                        );
                        entry.message = format!("EC2 is busy ({}); retrying", e.code);
                        plan.busy = true;
                        return Err(e.into());
                    }
                    _ => {
                        let (why, message) = status::copy_error(&e);
                        entry.state = state::ERROR.into();
                        entry.reason = Some(why.into());
                        entry.message = message.clone();
                        plan.notes.push(Note {
                            warning: true,
                            reason: "CopyRejected",
                            region: region.to_string(),
                            message: format!("{region}: {message}"),
                        });
                    }
                },
            }
        }
        Action::TagImage {
            region,
            image_id,
            tags,
        } => ec2.create_tags(&region, &[image_id], &tags).await?,
        Action::ClaimSnapshots {
            region,
            image_id,
            snapshot_ids,
            tags,
        } => claim_snapshots(ec2, &region, &image_id, &snapshot_ids, &tags).await?,
        Action::Retire { region, image } => {
            retire(ec2, &m.uid, &region, &image).await?;
            plan.notes.push(Note {
                warning: false,
                reason: "Deregistered",
                region: region.to_string(),
                message: format!(
                    "deregistered {} in {region} and deleted its snapshots",
                    image.id
                ),
            });
        }
        Action::Release { region, image } => {
            let mut ids = vec![image.id.clone()];
            ids.extend(owned_snapshot_ids(ec2, &m.uid, &region, &image).await?);
            let keys = [UID_TAG, OWNER_TAG, SOURCE_TAG].map(String::from);
            ec2.delete_tags(&region, &ids, &keys).await?;
            plan.notes.push(Note {
                warning: false,
                reason: "Retained",
                region: region.to_string(),
                message: format!("{} in {region} is retained and no longer managed", image.id),
            });
        }
    }
    Ok(())
}

/// Tags those of an owned image's snapshots that carry no owner's UID tag yet
/// (peers that ignore TagSpecifications on copy); never re-tags another
/// owner's snapshot.
async fn claim_snapshots<E: Ec2>(
    ec2: &E,
    region: &str,
    image_id: &str,
    snapshot_ids: &[String],
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    let unclaimed: Vec<String> = ec2
        .describe_snapshots(region, snapshot_ids)
        .await?
        .into_iter()
        .filter(|s| !s.tags.contains_key(UID_TAG))
        .map(|s| s.id)
        .collect();
    if !unclaimed.is_empty() {
        info!(%region, image = %image_id, snapshots = ?unclaimed, "tagging the snapshots of a target image");
        ec2.create_tags(region, &unclaimed, tags).await?;
    }
    Ok(())
}

/// Snapshots of `image` that carry this object's UID tag.
async fn owned_snapshot_ids<E: Ec2>(
    ec2: &E,
    uid: &str,
    region: &str,
    image: &ImageInfo,
) -> Result<Vec<String>> {
    let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
    Ok(ec2
        .describe_snapshots(region, &ids)
        .await?
        .into_iter()
        .filter(|s| s.tags.get(UID_TAG).map(String::as_str) == Some(uid))
        .map(|s| s.id)
        .collect())
}

/// Deregisters an owned image and deletes its owned snapshots. Refuses an
/// image without this object's UID tag, whatever anyone says about it.
async fn retire<E: Ec2>(ec2: &E, uid: &str, region: &str, image: &ImageInfo) -> Result<()> {
    if !image.owned_by(uid) {
        warn!(%region, image = %image.id, "refusing to deregister an image this object does not own");
        return Ok(());
    }
    let snapshots = owned_snapshot_ids(ec2, uid, region, image).await?;
    ec2.deregister_image(region, &image.id).await?;
    info!(%region, image = %image.id, "deregistered");
    for snap in snapshots {
        ec2.delete_snapshot(region, &snap).await?;
    }
    Ok(())
}

/// Finalizer: with `Delete`, deregister every owned image and delete every
/// owned snapshot in every region of interest; the finalizer goes only when
/// that succeeded. With `Retain`, leave everything.
async fn cleanup<E: Ec2>(obj: &AmiCopy, ctx: &Context<E>) -> Result<Requeue> {
    let m = meta(obj)?;
    if obj.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.publish(
            obj,
            &Note {
                warning: false,
                reason: "Retained",
                region: String::new(),
                message: "deletionPolicy is Retain: target images are left in place".into(),
            },
        )
        .await;
        return Ok(Requeue::await_change());
    }
    let ec2 = &ctx.ec2;
    let tags = plan::desired_tags(&obj.spec, &m, &obj.spec.source.image_id);
    for region in plan::regions_of_interest(&obj.spec, obj.status.as_ref()) {
        for image in ec2.owned_images(&region, &m.uid).await? {
            // Claim this image's untagged snapshots first, so the sweep below
            // finds them even on peers that ignore TagSpecifications.
            let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
            claim_snapshots(ec2, &region, &image.id, &ids, &tags).await?;
            ec2.deregister_image(&region, &image.id).await?;
            ctx.publish(
                obj,
                &Note {
                    warning: false,
                    reason: "Deregistered",
                    region: region.to_string(),
                    message: format!("deregistered {} in {region}", image.id),
                },
            )
            .await;
        }
        for snap in ec2.owned_snapshots(&region, &m.uid).await? {
            ec2.delete_snapshot(&region, &snap.id).await?;
        }
        let left = ec2.owned_images(&region, &m.uid).await?;
        if !left.is_empty() {
            let ids: Vec<&str> = left.iter().map(|i| i.id.as_str()).collect();
            return Err(Error::CleanupPending {
                region,
                what: format!("images still listed: {}", ids.join(", ")),
            });
        }
    }
    info!("all target images deregistered and snapshots deleted");
    Ok(Requeue::await_change())
}

/// Writes status by server-side apply, unless nothing changed.
async fn write_status(api: &Api<AmiCopy>, obj: &AmiCopy, status: &AmiCopyStatus) -> Result<()> {
    if obj.status.as_ref() == Some(status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "amicopy.dev/v1alpha1",
        "kind": "AmiCopy",
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ec2::{CopyRequest, SnapshotInfo, SnapshotRef};

    /// An in-memory EC2 account: images and snapshots per region, and a log
    /// of the mutating calls made.
    #[derive(Default)]
    struct FakeEc2 {
        images: Mutex<BTreeMap<(String, String), ImageInfo>>,
        snapshots: Mutex<BTreeMap<(String, String), SnapshotInfo>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeEc2 {
        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    fn not_found(what: &str) -> Ec2Error {
        Ec2Error::new(format!("{what}.NotFound"), "no such thing")
    }

    impl Ec2 for FakeEc2 {
        async fn describe_image(
            &self,
            region: &str,
            id: &str,
        ) -> Result<Option<ImageInfo>, Ec2Error> {
            Ok(self
                .images
                .lock()
                .unwrap()
                .get(&(region.into(), id.into()))
                .cloned())
        }
        async fn owned_images(&self, region: &str, uid: &str) -> Result<Vec<ImageInfo>, Ec2Error> {
            let images = self.images.lock().unwrap();
            Ok(images
                .iter()
                .filter(|((r, _), i)| r == region && i.owned_by(uid))
                .map(|(_, i)| i.clone())
                .collect())
        }
        async fn copy_image(&self, region: &str, req: &CopyRequest) -> Result<String, Ec2Error> {
            self.log(format!("CopyImage {region} {}", req.source_image_id));
            Ok("ami-00000000000000042".into())
        }
        async fn create_tags(
            &self,
            region: &str,
            ids: &[String],
            tags: &BTreeMap<String, String>,
        ) -> Result<(), Ec2Error> {
            self.log(format!("CreateTags {region} {ids:?}"));
            for id in ids {
                if let Some(s) = self
                    .snapshots
                    .lock()
                    .unwrap()
                    .get_mut(&(region.into(), id.clone()))
                {
                    s.tags.extend(tags.clone());
                }
            }
            Ok(())
        }
        async fn delete_tags(
            &self,
            region: &str,
            ids: &[String],
            _keys: &[String],
        ) -> Result<(), Ec2Error> {
            self.log(format!("DeleteTags {region} {ids:?}"));
            Ok(())
        }
        async fn deregister_image(&self, region: &str, id: &str) -> Result<(), Ec2Error> {
            self.log(format!("DeregisterImage {region} {id}"));
            self.images
                .lock()
                .unwrap()
                .remove(&(region.into(), id.into()));
            Ok(())
        }
        async fn describe_snapshots(
            &self,
            region: &str,
            ids: &[String],
        ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
            let snaps = self.snapshots.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| snaps.get(&(region.into(), id.clone())).cloned())
                .collect())
        }
        async fn owned_snapshots(
            &self,
            region: &str,
            uid: &str,
        ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
            let snaps = self.snapshots.lock().unwrap();
            Ok(snaps
                .iter()
                .filter(|((r, _), s)| {
                    r == region && s.tags.get(UID_TAG).map(String::as_str) == Some(uid)
                })
                .map(|(_, s)| s.clone())
                .collect())
        }
        async fn delete_snapshot(&self, region: &str, id: &str) -> Result<(), Ec2Error> {
            self.log(format!("DeleteSnapshot {region} {id}"));
            match self
                .snapshots
                .lock()
                .unwrap()
                .remove(&(region.into(), id.into()))
            {
                Some(_) => Ok(()),
                None => Err(not_found("InvalidSnapshot")),
            }
        }
    }

    const UID: &str = "uid-1";

    fn world(image_tags: &[(&str, &str)]) -> (FakeEc2, ImageInfo) {
        let ec2 = FakeEc2::default();
        let image = ImageInfo {
            id: "ami-00000000000000001".into(),
            state: "available".into(),
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
        let (ec2, image) = world(&[(UID_TAG, UID)]);
        retire(&ec2, UID, "eu-west-1", &image).await.unwrap();
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
    async fn retire_refuses_an_image_without_this_objects_uid() {
        for tags in [&[][..], &[(UID_TAG, "uid-2")][..]] {
            let (ec2, image) = world(tags);
            retire(&ec2, UID, "eu-west-1", &image).await.unwrap();
            assert!(
                ec2.calls.lock().unwrap().is_empty(),
                "no call at all: {:?}",
                ec2.calls.lock().unwrap()
            );
            assert_eq!(ec2.images.lock().unwrap().len(), 1);
            assert_eq!(ec2.snapshots.lock().unwrap().len(), 3);
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = Config {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            ..Config::default()
        };
        assert_eq!(backoff(&c, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&c, 2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&c, 4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&c, 30, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&c, 2, 0.5), Duration::from_secs(1));
    }
}
