//! The controller: observe → plan → act → report, behind kube-runtime's
//! finalizer helper.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use rand::Rng;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, instrument, warn};

use crate::api::{
    AmiCopy, AmiCopySpec, AmiCopyStatus, DeletionPolicy, FINALIZER, OWNER_TAG, PINNED_ANNOTATION,
    ResolvedSource, SOURCE_TAG, TargetStatus, UID_TAG,
};
use crate::ec2::{self, Ec2, Ec2Error, ErrorKind, ImageInfo, ImageQuery, Permission};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::plan::{self, Action, Meta, Note, Observed};
use crate::status::{self, reason, state};
use crate::tracker::{Known, Tracker, TrackerConfig};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

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
    /// Track targets in shared batches (the default) instead of each object
    /// polling its own.
    pub batched: bool,
    /// Copies in flight per destination region (batched tracking).
    pub dest_copy_limit: usize,
    /// Copies in flight from one source region (batched tracking).
    pub source_copy_limit: usize,
    /// How often a `source.selector` is resolved again.
    pub source_refresh_interval: Duration,
    /// Whether `sharing.public` may make images public.
    pub allow_public_images: bool,
    /// Reconciles running at once: bounds memory (each holds its EC2 calls'
    /// buffers) and the burst of calls to EC2 and the API server.
    pub concurrency: u16,
}

impl Default for Config {
    fn default() -> Self {
        let tracker = TrackerConfig::default();
        Self {
            poll_interval: tracker.interval,
            resync_interval: tracker.drift_interval,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            batched: true,
            dest_copy_limit: tracker.dest_limit,
            source_copy_limit: tracker.source_limit,
            source_refresh_interval: Duration::from_secs(600),
            allow_public_images: false,
            concurrency: 16,
        }
    }
}

/// Shared state of every reconcile.
pub struct Context<E> {
    pub client: Client,
    pub ec2: E,
    events: Events,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Shared batched tracking; `None` when each object polls its own targets.
    pub tracker: Option<Tracker>,
    wake: tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<AmiCopy>>>>,
    failures: Mutex<HashMap<ObjectRef<AmiCopy>, u32>>,
}

impl<E: Ec2> Context<E> {
    pub fn new(client: Client, ec2: E, metrics: Arc<Metrics>, config: Config) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (tracker, wake) = if config.batched {
            let (tracker, wake) = Tracker::new(TrackerConfig {
                interval: config.poll_interval,
                drift_interval: config.resync_interval,
                dest_limit: config.dest_copy_limit,
                source_limit: config.source_copy_limit,
                ..TrackerConfig::default()
            });
            (Some(tracker), Some(wake))
        } else {
            (None, None)
        };
        Self {
            events: Events::new(client.clone(), reporter),
            client,
            ec2,
            metrics,
            config,
            tracker,
            wake: tokio::sync::Mutex::new(wake),
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
        self.events.publish(&event, &obj.object_ref(&())).await;
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run<E: Ec2>(
    ctx: Arc<Context<E>>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Listed and watched untyped: one object the AmiCopy types cannot read
    // would otherwise fail every list of the watch, and no object would be
    // served. Each object is read as an AmiCopy before it reaches the cache,
    // which so holds typed objects only, a fraction of the memory of JSON
    // values; the unreadable ones are reported on instead.
    let ar = ApiResource::erase::<AmiCopy>(&());
    let api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &ar),
        None => Api::all_with(ctx.client.clone(), &ar),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Objects whose targets changed, as the tracker sees them. The receiver
    // stays in the context so that a later run (a new leadership) gets it.
    let woken = futures::stream::unfold(ctx.clone(), |ctx| async move {
        let next = ctx.wake.lock().await.as_mut()?.recv().await?;
        Some((next, ctx))
    });
    let writer = reflector::store::Writer::<AmiCopy>::default();
    let reader = writer.as_reader();
    let cached = reader.clone();
    let (unreadable_tx, unreadable_rx) = futures::channel::mpsc::unbounded();
    // Listed in pages of 500 (the default) with the most recent semantic: a
    // list from resourceVersion 0 may ignore the page size and bring every
    // object at once, a burst of memory with tens of thousands of objects.
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            future::ready(match event {
                Ok(event) => read_event(event, &cached, &unreadable_tx).map(Ok),
                Err(e) => Some(Err(e)),
            })
        })
        .reflect(writer)
        .touched_objects();
    let controller = Controller::for_stream(objects, reader)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        )
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .reconcile_on(woken)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            if let Err(e) = res {
                // One failed reconcile never stops the others.
                warn!(error = %e, "reconcile failed");
            }
            future::ready(())
        });
    let reporting = unreadable_rx
        .take_until(stopped(stop_rx.clone()))
        .for_each_concurrent(4, |unread| {
            let ctx = ctx.clone();
            async move { report_unreadable(unread, &ctx).await }
        });
    let tracking = async {
        if let Some(tracker) = &ctx.tracker {
            tracker
                .run(&ctx.ec2, &ctx.metrics, stopped(stop_rx.clone()))
                .await;
        }
    };
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    future::join4(controller, reporting, tracking, stop).await;
}

/// An object that does not read as an AmiCopy, and the parser's complaint.
type Unreadable = (DynamicObject, String);

/// The typed form of a watch event. An object that does not read as an
/// AmiCopy goes to `unreadable` and out of the cache, so that nothing acts
/// on an earlier version of it. managedFields and kubectl's copy of the last
/// applied manifest are dropped: the operator reads neither.
fn read_event(
    event: watcher::Event<DynamicObject>,
    cache: &reflector::Store<AmiCopy>,
    unreadable: &futures::channel::mpsc::UnboundedSender<Box<Unreadable>>,
) -> Option<watcher::Event<AmiCopy>> {
    use watcher::Event as E;
    let read = |mut raw: DynamicObject| {
        raw.managed_fields_mut().clear();
        raw.annotations_mut().remove(LAST_APPLIED);
        serde_json::to_value(&raw)
            .and_then(serde_json::from_value::<AmiCopy>)
            .map_err(|e| Box::new((raw, e.to_string())))
    };
    let cached = |raw: &DynamicObject| {
        let key = ObjectRef::new(&raw.name_any()).within(&raw.namespace().unwrap_or_default());
        cache.get(&key).map(|obj| E::Delete(obj.as_ref().clone()))
    };
    match event {
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
        E::InitApply(raw) => match read(raw) {
            Ok(obj) => Some(E::InitApply(obj)),
            Err(unread) => {
                let _ = unreadable.unbounded_send(unread);
                None
            }
        },
        E::Apply(raw) => match read(raw) {
            Ok(obj) => Some(E::Apply(obj)),
            Err(unread) => {
                let stale = cached(&unread.0);
                let _ = unreadable.unbounded_send(unread);
                stale
            }
        },
        E::Delete(raw) => match read(raw) {
            Ok(obj) => Some(E::Delete(obj)),
            Err(unread) => cached(&unread.0),
        },
    }
}

/// Reports an object that cannot be read, retrying a failed report a few
/// times; a change to the object brings it back here anyway.
async fn report_unreadable<E: Ec2>(unread: Box<Unreadable>, ctx: &Context<E>) {
    let (raw, error) = *unread;
    let why = unreadable(&raw).unwrap_or(error);
    warn!(object = %format!("{}/{}", raw.namespace().unwrap_or_default(), raw.name_any()), error = %why, "cannot read the object; skipping it until it changes");
    ctx.metrics.reconciled("invalid_object", Duration::ZERO);
    for attempt in 1..=5 {
        match report_invalid(&raw, &why, ctx).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff(&ctx.config, attempt, rand::rng().random_range(0.5..1.5));
                warn!(error = %e, retry_in = ?delay, "could not report an unreadable object");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What cannot be read, spec or status, without a position (which would
/// change with every write and make the report differ each time).
fn unreadable(raw: &DynamicObject) -> Option<String> {
    let part = |key: &str| raw.data.get(key).cloned().unwrap_or_default();
    if let Err(e) = serde_json::from_value::<AmiCopySpec>(part("spec")) {
        return Some(format!("spec: {e}"));
    }
    let status = part("status");
    if !status.is_null()
        && let Err(e) = serde_json::from_value::<AmiCopyStatus>(status)
    {
        return Some(format!("status: {e}"));
    }
    None
}

/// Ready=False and Degraded=True with reason InvalidSpec, and a Warning
/// Event; written once per message, so the watch event it causes ends here.
async fn report_invalid<E: Ec2>(raw: &DynamicObject, why: &str, ctx: &Context<E>) -> Result<()> {
    let message = format!(
        "the object cannot be read as an AmiCopy ({why}); correct it (kubectl explain amicopy) or delete it"
    );
    let reported = raw.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == status::DEGRADED
                    && c["reason"] == reason::INVALID_SPEC
                    && c["message"] == message.as_str()
            })
        });
    let Some(ns) = raw.namespace() else {
        return Ok(());
    };
    if reported {
        return Ok(());
    }
    let now = Time(Timestamp::now());
    let condition = |type_: &str, status: &str| {
        json!({"type": type_, "status": status, "reason": reason::INVALID_SPEC,
               "message": message, "lastTransitionTime": now,
               "observedGeneration": raw.metadata.generation})
    };
    // A merge patch of the conditions alone: the rest of the status (the
    // targets recorded so far) stays for when the object is corrected.
    let patch = json!({"status": {"conditions": [
        condition(status::READY, "False"),
        condition(status::DEGRADED, "True"),
    ]}});
    let ar = ApiResource::erase::<AmiCopy>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch_status(&raw.name_any(), &params, &Patch::Merge(&patch))
        .await
        .map_err(Error::Kube)?;
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason::INVALID_SPEC.into(),
        note: Some(message.chars().take(1000).collect()),
        action: reason::INVALID_SPEC.into(),
        secondary: None,
    };
    ctx.events.publish(&event, &raw.object_ref(&ar)).await;
    Ok(())
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
    let key = ObjectRef::from_obj(obj.as_ref());
    let n = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let n = failures.entry(key).or_insert(0);
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

fn meta(obj: &AmiCopy, config: &Config) -> Result<Meta> {
    let pinned = obj
        .annotations()
        .get(PINNED_ANNOTATION)
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Meta {
        pinned,
        allow_public: config.allow_public_images,
        namespace: obj
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?,
        name: obj.name_any(),
        uid: obj.uid().ok_or(Error::MissingField("metadata.uid"))?,
        generation: obj.meta().generation,
    })
}

/// What EC2 holds for this object: from the tracker's cache when it knows
/// every target the status names, else by asking EC2 (and tracking what it
/// says).
async fn observe<E: Ec2>(
    obj: &AmiCopy,
    m: &Meta,
    scopes: &BTreeMap<String, String>,
    ctx: &Context<E>,
) -> Result<Observed> {
    let spec = &obj.spec;
    let previous = obj.status.as_ref();
    let ec2 = &ctx.ec2;
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
        Some(id) => observe_source(&spec.source.region, id, ec2, tracker).await,
        None => Ok(None),
    };
    if let Some((owned, recorded)) = tracker.and_then(|t| from_cache(obj, m, source_id?, scopes, t))
    {
        return Ok(Observed {
            source: Some(source),
            owned,
            recorded,
            unreachable: BTreeMap::new(),
            resolved,
        });
    }
    // A region EC2 cannot be asked about is reported on its destination; the
    // others go on.
    let regions = plan::regions_of_interest(spec, previous);
    let mut owned: BTreeMap<String, Vec<ImageInfo>> = BTreeMap::new();
    let mut unreachable = BTreeMap::new();
    for (region, res) in future::join_all(regions.into_iter().map(|r| async move {
        let res = ec2.owned_images(&at(scopes, &r), &m.uid).await;
        (r, res)
    }))
    .await
    {
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
    let recorded = future::try_join_all(plan::recorded_to_check(previous, &owned).into_iter().map(
        |(r, id)| async move {
            let img = ec2.describe_image(&at(scopes, &r), &id).await?;
            Ok::<_, Ec2Error>((id, img))
        },
    ))
    .await?
    .into_iter()
    .collect();
    if let Some(t) = tracker {
        let key = object_ref(m);
        for (region, images) in &owned {
            for img in images {
                t.track(&key, &at(scopes, region), img.clone(), &spec.source.region);
            }
        }
    }
    Ok(Observed {
        source: Some(source),
        owned,
        recorded,
        unreachable,
        resolved,
    })
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
    let images = ctx.ec2.find_images(&obj.spec.source.region, &query).await?;
    // Newest first; EC2's creation dates sort as text.
    let newest = images
        .into_iter()
        .filter(|i| i.state == state::AVAILABLE)
        .max_by(|a, b| a.creation_date.cmp(&b.creation_date).then(a.id.cmp(&b.id)));
    Ok(newest.map(|img| ResolvedSource {
        image_id: img.id,
        name: img.name,
        resolved_at: now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    }))
}

/// The source image; EC2's refusals (not found, access denied) become part
/// of the observation, transient errors end the reconcile.
async fn observe_source<E: Ec2>(
    region: &str,
    id: &str,
    ec2: &E,
    tracker: Option<&Tracker>,
) -> std::result::Result<Option<ImageInfo>, Ec2Error> {
    if let Some(hit) = tracker.and_then(|t| t.source(region, id)) {
        return Ok(hit);
    }
    match ec2.describe_image(region, id).await {
        Ok(img) => {
            if let Some(t) = tracker {
                t.remember_source(region, id, img.clone());
            }
            Ok(img)
        }
        Err(e) => {
            warn!(%region, error = %e, "cannot read the source image");
            Err(e)
        }
    }
}

type Targets = (
    BTreeMap<String, Vec<ImageInfo>>,
    BTreeMap<String, Option<ImageInfo>>,
);

/// The targets as the tracker knows them, if it knows every one the status
/// names and the spec has not changed since that status.
fn from_cache(
    obj: &AmiCopy,
    m: &Meta,
    source_id: &str,
    scopes: &BTreeMap<String, String>,
    tracker: &Tracker,
) -> Option<Targets> {
    let prev = obj.status.as_ref()?;
    if prev.observed_generation != m.generation
        || prev.source_image_id.as_deref() != Some(source_id)
    {
        return None;
    }
    for d in &obj.spec.destinations {
        let t = prev.destinations.iter().find(|t| t.region == d.region)?;
        let unstarted = matches!(
            t.state.as_str(),
            state::QUEUED | state::WAITING | state::ERROR
        );
        if t.image_id.is_none() && !unstarted {
            return None;
        }
    }
    let mut owned: BTreeMap<String, Vec<ImageInfo>> =
        plan::regions_of_interest(&obj.spec, Some(prev))
            .into_iter()
            .map(|r| (r, Vec::new()))
            .collect();
    let mut recorded = BTreeMap::new();
    for t in prev
        .destinations
        .iter()
        .chain(&prev.retiring)
        .chain(&prev.generations)
    {
        let Some(id) = &t.image_id else { continue };
        match tracker.lookup(&at(scopes, &t.region), id) {
            Known::Unknown => return None,
            Known::Image(Some(info)) if info.owned_by(&m.uid) => {
                owned.entry(t.region.clone()).or_default().push(info)
            }
            Known::Image(other) => {
                recorded.insert(id.clone(), other);
            }
        }
    }
    Some((owned, recorded))
}

/// Where EC2 calls for each region go: the destination's role (another
/// account), or for a region no longer listed, the role (and external ID)
/// its copies were made through; this account otherwise.
fn scopes(obj: &AmiCopy) -> BTreeMap<String, String> {
    let mut scopes = BTreeMap::new();
    if let Some(st) = &obj.status {
        for t in st
            .destinations
            .iter()
            .chain(&st.retiring)
            .chain(&st.generations)
        {
            if let Some(role) = &t.role_arn {
                let scope = ec2::scope(&t.region, Some(role), t.external_id.as_deref());
                scopes.insert(t.region.clone(), scope);
            }
        }
    }
    for d in &obj.spec.destinations {
        let scope = ec2::scope(&d.region, d.role_arn.as_deref(), d.external_id.as_deref());
        scopes.insert(d.region.clone(), scope);
    }
    scopes
}

fn at(scopes: &BTreeMap<String, String>, region: &str) -> String {
    scopes
        .get(region)
        .cloned()
        .unwrap_or_else(|| region.to_owned())
}

fn object_ref(m: &Meta) -> ObjectRef<AmiCopy> {
    ObjectRef::new(&m.name).within(&m.namespace)
}

async fn apply<E: Ec2>(obj: &AmiCopy, api: &Api<AmiCopy>, ctx: &Context<E>) -> Result<Requeue> {
    let m = meta(obj, &ctx.config)?;
    let scopes = scopes(obj);
    let observed = observe(obj, &m, &scopes, ctx).await?;
    let now = Time(Timestamp::now());
    let mut plan = plan::plan(&obj.spec, &m, obj.status.as_ref(), &observed, &now);
    let mut deferred: Option<Error> = None;

    // Claims touch only the snapshots of images already ours, so they go
    // first and all at once: when copies turn available, an object claims
    // the snapshots of each of them.
    let mut claims = Vec::new();
    let mut actions = Vec::new();
    for action in std::mem::take(&mut plan.actions) {
        match action {
            Action::ClaimSnapshots {
                region,
                image_id,
                snapshot_ids,
                tags,
            } => {
                let at = at(&scopes, &region);
                claims.push(async move {
                    claim_snapshots(&ctx.ec2, &at, &image_id, &snapshot_ids, &tags).await
                });
            }
            other => actions.push(other),
        }
    }
    let mut results = future::join_all(claims).await;
    for action in actions {
        results.push(act(&m, ctx, &scopes, &mut plan, action).await);
    }
    for res in results {
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
    let notes = plan::merge_notes(&plan.notes);
    future::join_all(notes.iter().map(|note| ctx.publish(obj, note))).await;
    // EC2 faults still back off, after the status says what is going on.
    if let Some(e) = deferred.or_else(|| observed.transient_error().cloned().map(Error::from)) {
        return Err(e);
    }
    // With the tracker, pending copies wake their object when they change;
    // only copies that have not started yet are looked at on a timer.
    let unstarted = plan
        .status
        .destinations
        .iter()
        .any(|d| d.state == state::WAITING || d.state == state::QUEUED);
    let poll = plan.busy && (ctx.tracker.is_none() || unstarted);
    let mut next = if poll {
        ctx.config.poll_interval
    } else if ctx.tracker.is_some() {
        // The tracker re-checks every target each drift period and wakes the
        // object on a change; this is only a safety net, so that thousands of
        // settled objects do not all wake up every period for nothing.
        ctx.config.resync_interval * 6
    } else {
        ctx.config.resync_interval
    };
    // A selector is resolved again on its own schedule.
    if obj.spec.source.image_id.is_none() {
        next = next.min(ctx.config.source_refresh_interval);
    }
    Ok(Requeue::requeue(next))
}

async fn act<E: Ec2>(
    m: &Meta,
    ctx: &Context<E>,
    scopes: &BTreeMap<String, String>,
    plan: &mut plan::Plan,
    action: Action,
) -> Result<()> {
    let ec2 = &ctx.ec2;
    // EC2 calls go to the region's scope (its account); status and messages
    // name the region.
    let at = at(scopes, action.region());
    let at = at.as_str();
    match action {
        Action::Copy {
            index,
            region,
            request,
        } => {
            let key = object_ref(m);
            let src_region = request.source_region.as_str();
            let entry = &mut plan.status.destinations[index];
            if let Some(t) = &ctx.tracker
                && let Err(queued) = t.admit(&key, at, src_region)
            {
                entry.state = state::QUEUED.into();
                entry.reason = Some(reason::COPY_QUEUED.into());
                entry.message = queued.message;
                return Ok(());
            }
            match ec2.copy_image(at, &request).await {
                Ok(id) => {
                    info!(%region, image = %id, "copy started");
                    ctx.metrics.copy_started(&region);
                    entry.image_id = Some(id.clone());
                    if let Some(t) = &ctx.tracker {
                        let placeholder = ImageInfo {
                            id: id.clone(),
                            state: state::PENDING.into(),
                            tags: request.tags.clone(),
                            ..ImageInfo::default()
                        };
                        t.track_new(&key, at, placeholder, src_region);
                    }
                    plan.notes.push(Note {
                        warning: false,
                        reason: "CopyStarted",
                        region: region.to_string(),
                        message: format!("copying {} to {region} as {id}", request.source_image_id),
                    });
                    // Some EC2 peers ignore TagSpecifications; the image ID
                    // just returned is certainly ours, so tag it explicitly.
                    ec2.create_tags(at, std::slice::from_ref(&id), &request.tags)
                        .await?;
                }
                Err(e) => {
                    if let Some(t) = &ctx.tracker {
                        t.release(at, src_region);
                    }
                    match e.kind {
                        ErrorKind::Throttled if e.code == "ResourceLimitExceeded" => {
                            entry.state = state::QUEUED.into();
                            entry.reason = Some(reason::COPY_QUOTA.into());
                            entry.message = format!(
                                "EC2's copy quota in {region} is reached; the operator slows down and retries"
                            );
                            match &ctx.tracker {
                                Some(t) => t.lower_limit(at),
                                None => return Err(e.into()),
                            }
                        }
                        ErrorKind::Throttled | ErrorKind::Transient => {
                            entry.state = state::WAITING.into();
                            entry.reason = Some(reason::WAITING.into());
                            entry.message = format!("EC2 is busy ({}); retrying", e.code);
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
                    }
                }
            }
        }
        Action::TagImage {
            region,
            image_id,
            resource_ids,
            tags,
        } => {
            info!(%region, image = %image_id, "updating the tags of a target and its snapshots");
            ec2.create_tags(at, &resource_ids, &tags).await?
        }
        Action::Untag {
            resource_ids, keys, ..
        } => ec2.delete_tags(at, &resource_ids, &keys).await?,
        Action::Share {
            region,
            image_id,
            snapshot_ids,
            add,
            remove,
            want,
        } => {
            let (launch_add, volume_add) = split_permissions(&add);
            let (launch_remove, volume_remove) = split_permissions(&remove);
            if !launch_add.is_empty() || !launch_remove.is_empty() {
                ec2.set_launch_permissions(at, &image_id, &launch_add, &launch_remove)
                    .await?;
            }
            if !volume_add.is_empty() || !volume_remove.is_empty() {
                for snap in &snapshot_ids {
                    ec2.set_snapshot_permissions(at, snap, &volume_add, &volume_remove)
                        .await?;
                }
            }
            info!(%region, image = %image_id, added = ?add, removed = ?remove, "launch permissions updated");
            if let Some(t) = entry_for(plan, &image_id) {
                t.shared_with = want;
            }
            plan.notes.push(Note {
                warning: false,
                reason: "Shared",
                region: region.to_string(),
                message: format!(
                    "{image_id} in {region}: permissions added {add:?}, removed {remove:?}"
                ),
            });
        }
        Action::Deprecate {
            region,
            image_id,
            at: when,
        } => {
            ec2.deprecate_image(at, &image_id, &when).await?;
            plan.notes.push(Note {
                warning: false,
                reason: "Deprecated",
                region: region.to_string(),
                message: format!("{image_id} in {region} is deprecated from {when}"),
            });
            if let Some(t) = entry_for(plan, &image_id) {
                t.deprecation_time = Some(when);
            }
        }
        Action::ClaimSnapshots { .. } => unreachable!("apply runs the claims, all at once"),
        Action::Retire { region, image } => {
            retire(ec2, &m.uid, at, &image).await?;
            forget_target(ctx, plan, &region, at, &image.id);
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
            ids.extend(owned_snapshot_ids(ec2, &m.uid, at, &image).await?);
            let keys = [UID_TAG, OWNER_TAG, SOURCE_TAG].map(String::from);
            ec2.delete_tags(at, &ids, &keys).await?;
            forget_target(ctx, plan, &region, at, &image.id);
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

/// The status entry of a current or kept copy.
fn entry_for<'a>(plan: &'a mut plan::Plan, image_id: &str) -> Option<&'a mut TargetStatus> {
    plan.status
        .destinations
        .iter_mut()
        .chain(plan.status.generations.iter_mut())
        .find(|t| t.image_id.as_deref() == Some(image_id))
}

/// Status permission keys split into launch permissions and the accounts
/// given createVolumePermission on the snapshots.
fn split_permissions(keys: &[String]) -> (Vec<Permission>, Vec<String>) {
    let mut launch = Vec::new();
    let mut volume = Vec::new();
    for k in keys {
        match k.strip_prefix(plan::VOLUME_PREFIX) {
            Some(account) => volume.push(account.to_owned()),
            None => launch.extend(Permission::from_key(k)),
        }
    }
    (launch, volume)
}

/// A retired or released target leaves the tracker and the status.
fn forget_target<E>(ctx: &Context<E>, plan: &mut plan::Plan, region: &str, at: &str, id: &str) {
    if let Some(t) = &ctx.tracker {
        t.untrack(at, id);
    }
    plan.status
        .retiring
        .retain(|r| !(r.region == region && r.image_id.as_deref() == Some(id)));
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
    let m = meta(obj, &ctx.config)?;
    if let Some(t) = &ctx.tracker {
        t.forget(&object_ref(&m));
    }
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
    let source = obj
        .spec
        .source
        .effective_image_id(obj.status.as_ref())
        .unwrap_or_default();
    let tags = plan::desired_tags(&obj.spec, &m, source);
    let scopes = scopes(obj);
    // Every region is cleaned at once and to the end of what it can do, so
    // that a fault in one region neither delays nor undoes the others.
    let regions = plan::regions_of_interest(&obj.spec, obj.status.as_ref());
    let results = future::join_all(regions.into_iter().map(|region| {
        let at = at(&scopes, &region);
        let (m, tags) = (&m, &tags);
        async move {
            let res = clean_region(obj, ctx, m, tags, &region, &at).await;
            (region, res)
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

/// Deregisters this object's images in one region and deletes their
/// snapshots; an error once the region is known to still hold some.
async fn clean_region<E: Ec2>(
    obj: &AmiCopy,
    ctx: &Context<E>,
    m: &Meta,
    tags: &BTreeMap<String, String>,
    region: &str,
    at: &str,
) -> Result<()> {
    let ec2 = &ctx.ec2;
    let images = match ec2.owned_images(at, &m.uid).await {
        // A region that does not exist for this account holds nothing of
        // ours unless the status says a copy was made there.
        Err(e) if status::region_refused(&e) && !copied_to(obj, region) => {
            warn!(%region, error = %e, "region refused; nothing was copied there, nothing to clean up");
            return Ok(());
        }
        res => res?,
    };
    for image in images {
        // Claim this image's untagged snapshots first, so the sweep below
        // finds them even on peers that ignore TagSpecifications.
        let ids: Vec<String> = image.snapshots.iter().map(|s| s.id.clone()).collect();
        claim_snapshots(ec2, at, &image.id, &ids, tags).await?;
        ec2.deregister_image(at, &image.id).await?;
        ctx.publish(
            obj,
            &Note {
                warning: false,
                reason: "Deregistered",
                region: region.to_owned(),
                message: format!("deregistered {} in {region}", image.id),
            },
        )
        .await;
    }
    for snap in ec2.owned_snapshots(at, &m.uid).await? {
        ec2.delete_snapshot(at, &snap.id).await?;
    }
    let left = ec2.owned_images(at, &m.uid).await?;
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
fn copied_to(obj: &AmiCopy, region: &str) -> bool {
    obj.status.as_ref().is_some_and(|s| {
        s.destinations
            .iter()
            .chain(&s.retiring)
            .any(|t| t.region == region && t.image_id.is_some())
    })
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
    use crate::ec2::fake::FakeEc2;
    use crate::ec2::{SnapshotInfo, SnapshotRef};

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
    fn unreadable_names_the_part_without_a_position() {
        let raw = |spec: serde_json::Value, status: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
                "metadata": {"name": "x", "namespace": "ns"},
                "spec": spec, "status": status,
            }))
            .unwrap()
        };
        let good = json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
                          "destinations": [{"region": "eu-west-1"}]});
        assert_eq!(
            unreadable(&raw(good.clone(), serde_json::Value::Null)),
            None
        );
        let spec = unreadable(&raw(json!({"destinations": "eu-west-1"}), json!({}))).unwrap();
        assert!(spec.starts_with("spec: "), "{spec}");
        let status = unreadable(&raw(
            good,
            json!({"destinations": [{"region": "eu-west-1", "state": "pending", "attempt": -3}]}),
        ))
        .unwrap();
        assert!(
            status.starts_with("status: ") && status.contains("-3"),
            "{status}"
        );
        assert!(!status.contains("line"), "no position: {status}");
    }

    #[test]
    fn a_region_dropped_from_the_spec_is_reached_through_its_recorded_role() {
        const ROLE: &str = "arn:aws:iam::210987654321:role/amicopy";
        let mut obj: AmiCopy = serde_json::from_value(json!({
            "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"source": {"region": "us-east-1", "imageId": "ami-00000000000000001"},
                     "destinations": [{"region": "us-west-2"}]},
        }))
        .unwrap();
        obj.status = Some(AmiCopyStatus {
            retiring: vec![TargetStatus {
                region: "eu-west-1".into(),
                image_id: Some("ami-0000000000000000a".into()),
                role_arn: Some(ROLE.into()),
                external_id: Some("amicopy-test".into()),
                ..TargetStatus::default()
            }],
            ..AmiCopyStatus::default()
        });
        let scopes = scopes(&obj);
        assert_eq!(
            at(&scopes, "eu-west-1"),
            ec2::scope("eu-west-1", Some(ROLE), Some("amicopy-test"))
        );
        assert_eq!(at(&scopes, "us-west-2"), "us-west-2");
    }

    #[test]
    fn watch_events_reach_the_cache_typed_and_unreadable_ones_leave_it() {
        use watcher::Event as E;
        let raw = |name: &str, spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
                "metadata": {"name": name, "namespace": "ns",
                             "annotations": {LAST_APPLIED: "{}", "keep": "me"},
                             "managedFields": [{"manager": "kubectl"}]},
                "spec": spec,
            }))
            .unwrap()
        };
        let good = json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
                          "destinations": [{"region": "eu-west-1"}]});
        let bad = json!({"destinations": 42});
        let mut writer = reflector::store::Writer::<AmiCopy>::default();
        let cache = writer.as_reader();
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        let mut feed = |event: E<DynamicObject>| {
            let typed = read_event(event, &cache, &tx);
            if let Some(typed) = &typed {
                writer.apply_watcher_event(typed);
            }
            typed
        };
        let key = |name: &str| ObjectRef::<AmiCopy>::new(name).within("ns");

        feed(E::Init);
        assert!(feed(E::InitApply(raw("a", good.clone()))).is_some());
        assert!(
            feed(E::InitApply(raw("b", bad.clone()))).is_none(),
            "an unreadable object never reaches the cache"
        );
        feed(E::InitDone);
        let a = cache.get(&key("a")).expect("a is cached");
        assert!(a.managed_fields().is_empty());
        assert_eq!(a.annotations().keys().collect::<Vec<_>>(), ["keep"]);
        assert!(cache.get(&key("b")).is_none());
        let (reported, error) = *rx.try_recv().expect("b is reported");
        assert_eq!(reported.name_any(), "b");
        assert!(error.contains("42"), "{error}");

        match feed(E::Apply(raw("a", bad.clone()))) {
            Some(E::Delete(stale)) => assert_eq!(stale.name_any(), "a"),
            other => panic!("the readable version leaves the cache: {other:?}"),
        }
        assert!(cache.get(&key("a")).is_none());
        assert_eq!(rx.try_recv().unwrap().0.name_any(), "a");
        assert!(
            feed(E::Apply(raw("b", bad))).is_none(),
            "nothing cached to drop"
        );
        assert!(feed(E::Delete(raw("b", json!({})))).is_none());
        assert!(matches!(feed(E::Apply(raw("b", good))), Some(E::Apply(_))));
        assert!(cache.get(&key("b")).is_some(), "served once corrected");
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
