//! The controller: kube-runtime wiring around one reconcile pipeline.
//!
//! - [`intake`]: the watch, read untyped so that one object the types cannot
//!   read never breaks it; unreadable objects are reported on;
//! - [`reconcile`]: the pipeline, observe → plan → act → record → report,
//!   behind kube-runtime's finalizer helper, and the retry policy;
//! - [`observe`]: what Kubernetes and EC2 say about one object;
//! - [`act`]: the side effects of a plan, each returning a typed outcome;
//! - [`cleanup`]: the finalizer's clean-up when an object is deleted;
//! - [`report`]: the status write, Events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::api::AmiCopy;
use crate::ec2::Ec2;
use crate::events::Events;
use crate::metrics::{ConditionLabels, Metrics};
use crate::policy::{self, AmiCopyPolicy, Governing};
use crate::tracker::Tracker;
use cached::CachedAmiCopy;

mod act;
mod cached;
mod cleanup;
mod intake;
mod observe;
mod publish;
mod reconcile;
mod report;

pub use crate::config::Config;
pub use reconcile::backoff;

/// Field manager of the status written by server-side apply.
pub const FIELD_MANAGER: &str = "ami-copy-operator";

/// Shared state of every reconcile.
pub struct Context<E> {
    pub client: Client,
    pub ec2: E,
    events: Events,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Shared batched tracking; `None` when each object polls its own targets.
    pub tracker: Option<Tracker>,
    /// In-use look-ups of copies about to be retired, batched per scope.
    pub lookups: crate::usage::Lookups,
    wake: tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<AmiCopy>>>>,
    failures: Mutex<HashMap<ObjectRef<AmiCopy>, u32>>,
    /// Per object, the resourceVersion its last status write replaced: a
    /// copy of the object the watch still shows at that version is known to
    /// be behind, and is not planned from.
    superseded: Mutex<HashMap<ObjectRef<AmiCopy>, String>>,
    /// The AmiCopyPolicies and the namespaces' labels, as the watches of
    /// the current run see them.
    governance: RwLock<Option<(Store<AmiCopyPolicy>, Store<Namespace>)>>,
    /// Each object's conditions as the objects gauge last counted them.
    /// Shared: thousands of objects have the same few sets of conditions.
    counted: Mutex<Counted>,
}

impl<E: Ec2> Context<E> {
    pub fn new(client: Client, ec2: E, metrics: Arc<Metrics>, config: Config) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (tracker, wake) = if config.batched() {
            let (tracker, wake) = Tracker::new(config.clone());
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
            lookups: crate::usage::Lookups::default(),
            wake: tokio::sync::Mutex::new(wake),
            failures: Mutex::default(),
            superseded: Mutex::default(),
            governance: RwLock::default(),
            counted: Mutex::default(),
        }
    }

    /// Whether `obj`, as the watch shows it, is a version this operator has
    /// since written over.
    pub(crate) fn is_superseded(&self, key: &ObjectRef<AmiCopy>, obj: &AmiCopy) -> bool {
        let superseded = self.superseded.lock().expect("superseded lock");
        obj.metadata.resource_version.is_some()
            && superseded.get(key) == obj.metadata.resource_version.as_ref()
    }

    /// Notes that `written` (if a write happened) replaced `read`.
    pub(crate) fn superseding(
        &self,
        key: &ObjectRef<AmiCopy>,
        read: &AmiCopy,
        written: Option<&AmiCopy>,
    ) {
        if let (Some(_), Some(version)) = (written, &read.metadata.resource_version) {
            self.superseded
                .lock()
                .expect("superseded lock")
                .insert(key.clone(), version.clone());
        }
    }

    /// An object whose clean-up is done: out of the gauge and the records.
    pub(crate) fn forget_object(&self, key: &ObjectRef<AmiCopy>) {
        self.count_conditions(key.clone(), &[]);
        self.superseded.lock().expect("superseded lock").remove(key);
    }

    /// Counts `key`'s conditions in the objects gauge (none: it is gone).
    pub(crate) fn count_conditions(
        &self,
        key: ObjectRef<AmiCopy>,
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) {
        let new = Metrics::condition_labels(conditions);
        let old = self.counted.lock().expect("counted lock").set(key, &new);
        self.metrics
            .object_conditions(old.as_deref().unwrap_or_default(), &new);
    }

    /// The policies that govern `namespace`: those that select it by its
    /// labels, or the default policy when none does.
    pub(crate) fn governing(&self, namespace: &str) -> Vec<Governing> {
        let stores = self.governance.read().expect("governance lock").clone();
        let mut selected = Vec::new();
        if let Some((policies, namespaces)) = stores {
            let labels = labels_of(&namespaces, namespace);
            for p in policies.state() {
                if policy::selects(p.spec.namespace_selector.as_ref(), &labels) {
                    selected.push(Governing {
                        name: p.name_any(),
                        spec: p.spec.clone(),
                    });
                }
            }
        }
        if selected.is_empty() {
            selected.push(Governing {
                name: "default".into(),
                spec: self.config.default_policy.clone(),
            });
        }
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        selected
    }
}

/// The conditions the objects gauge counted for each object, each set of
/// them kept once.
#[derive(Default)]
struct Counted {
    by_object: HashMap<ObjectRef<AmiCopy>, Arc<[ConditionLabels]>>,
    sets: HashSet<Arc<[ConditionLabels]>>,
}

impl Counted {
    /// Records `labels` for `key` (none: forgets it); what was recorded
    /// before.
    fn set(
        &mut self,
        key: ObjectRef<AmiCopy>,
        labels: &[ConditionLabels],
    ) -> Option<Arc<[ConditionLabels]>> {
        let old = if labels.is_empty() {
            self.by_object.remove(&key)
        } else {
            let shared = match self.sets.get(labels) {
                Some(set) => set.clone(),
                None => {
                    let set: Arc<[ConditionLabels]> = labels.into();
                    self.sets.insert(set.clone());
                    set
                }
            };
            self.by_object.insert(key, shared)
        };
        // A set no object has any more goes.
        if let Some(set) = &old
            && Arc::strong_count(set) == 2
        {
            self.sets.remove(set.as_ref());
        }
        old
    }
}

/// Watches AmiCopyPolicies and namespaces into stores. The stream keeps the
/// stores up to date and must be polled on its own (not only as a trigger
/// of the controller, which waits for the stores); it yields each policy
/// that changed (or was deleted), whose namespaces' objects are looked at
/// again.
fn watch_governance(
    client: &Client,
) -> (
    (Store<AmiCopyPolicy>, Store<Namespace>),
    impl futures::Stream<Item = AmiCopyPolicy> + Send + 'static,
) {
    let (policies, policy_writer) = reflector::store();
    let (namespaces, namespace_writer) = reflector::store();
    let changes = watcher(
        Api::<AmiCopyPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(policy_writer)
    .touched_objects()
    .filter_map(|res| {
        if let Err(e) = &res {
            warn!(error = %e, "cannot watch AmiCopyPolicies (is crds/amicopy.dev_amicopypolicies.yaml installed?); no object is reconciled until they are known");
        }
        future::ready(res.ok().map(Some))
    });
    let labels = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(namespace_writer)
    .map(|_| None);
    let both = futures::stream::select(changes, labels).filter_map(future::ready);
    ((policies, namespaces), both)
}

/// A namespace's labels, as the watch shows them (none if it is unknown).
fn labels_of(namespaces: &Store<Namespace>, namespace: &str) -> BTreeMap<String, String> {
    namespaces
        .get(&ObjectRef::new(namespace))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default()
}

/// The objects in the namespaces `policy` selects.
fn governed_by(
    policy: &AmiCopyPolicy,
    objects: &Store<CachedAmiCopy>,
    namespaces: &Store<Namespace>,
) -> Vec<ObjectRef<CachedAmiCopy>> {
    objects
        .state()
        .iter()
        .filter(|o| {
            let ns = o.metadata.namespace.as_deref().unwrap_or_default();
            let labels = labels_of(namespaces, ns);
            policy::selects(policy.spec.namespace_selector.as_ref(), &labels)
        })
        .map(|o| cached::key_of(o.as_ref()))
        .collect()
}

/// Runs the controller until `shutdown` resolves.
pub async fn run<E: Ec2>(
    ctx: Arc<Context<E>>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Spec and status are read as raw JSON (see `cached`): one object the
    // AmiCopy types cannot read would otherwise fail every list of the
    // watch, and no object would be served (see `intake`).
    let api: Api<CachedAmiCopy> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Objects whose targets changed, as the tracker sees them. The receiver
    // stays in the context so that a later run (a new leadership) gets it.
    let woken = futures::stream::unfold(ctx.clone(), |ctx| async move {
        let next = ctx.wake.lock().await.as_mut()?.recv().await?;
        Some((cached::key(&next), ctx))
    });
    let writer = reflector::store::Writer::<CachedAmiCopy>::default();
    let reader = writer.as_reader();
    let cached = reader.clone();
    let known = reader.clone();
    let (unreadable_tx, unreadable_rx) = futures::channel::mpsc::unbounded();
    // Listed in pages of 500 (the default) with the most recent semantic: a
    // list from resourceVersion 0 may ignore the page size and bring every
    // object at once, a burst of memory with tens of thousands of objects.
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            future::ready(match event {
                Ok(event) => intake::read_event(event, &cached, &unreadable_tx).map(Ok),
                Err(e) => Some(Err(e)),
            })
        })
        .reflect(writer)
        .touched_objects()
        // The operator's own status writes come back through the watch; they
        // need no reconcile (each would plan again to find nothing to do).
        // What does: the spec (generation, which deletion bumps too), the
        // annotations (pins, pause), labels and finalizers.
        .predicate_filter(
            predicates::generation
                .combine(predicates::annotations)
                .combine(predicates::labels)
                .combine(predicates::finalizers),
            Default::default(),
        );
    let ((policies, namespaces), governance) = watch_governance(&ctx.client);
    let (policy_tx, policy_rx) = futures::channel::mpsc::unbounded();
    *ctx.governance.write().expect("governance lock") =
        Some((policies.clone(), namespaces.clone()));
    let controller = Controller::for_stream(objects, reader)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        )
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .reconcile_on(woken)
        .reconcile_on(policy_rx)
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| {
            if let Err(e) = res {
                // One failed reconcile never stops the others.
                warn!(error = %e, "reconcile failed");
            }
            future::ready(())
        });
    // No object is judged before the policies and namespaces are known: the
    // default policy would take away what a policy allows.
    let before_ready = stopped(stop_rx.clone());
    let controller = async move {
        let ready = future::join(policies.wait_until_ready(), namespaces.wait_until_ready());
        tokio::select! {
            _ = ready => controller.await,
            () = before_ready => {}
        }
    };
    // A policy that changed wakes the objects of the namespaces it selects.
    let governed_namespaces = ctx
        .governance
        .read()
        .expect("governance lock")
        .clone()
        .map(|(_, n)| n);
    let governance = governance
        .take_until(stopped(stop_rx.clone()))
        .for_each(move |policy| {
            if let Some(namespaces) = &governed_namespaces {
                for key in governed_by(&policy, &known, namespaces) {
                    let _ = policy_tx.unbounded_send(key);
                }
            }
            future::ready(())
        });
    let reporting = unreadable_rx
        .take_until(stopped(stop_rx.clone()))
        .for_each_concurrent(4, |unread| {
            let ctx = ctx.clone();
            async move { intake::report_unreadable(unread, &ctx).await }
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
    ctx.metrics.set_leading(true);
    future::join5(controller, reporting, tracking, stop, governance).await;
    ctx.metrics.set_leading(false);
}

/// The cache key of the object `m` describes.
fn object_ref(m: &crate::plan::Meta) -> ObjectRef<AmiCopy> {
    ObjectRef::new(&m.name).within(&m.namespace)
}

#[cfg(test)]
mod counted_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    use super::*;

    #[test]
    fn objects_with_the_same_conditions_share_one_set_and_it_goes_with_the_last() {
        let ready = |status: &str| {
            Metrics::condition_labels(&[Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: "Available".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            }])
        };
        let key = |name: &str| ObjectRef::<AmiCopy>::new(name).within("ns");
        let mut counted = Counted::default();
        assert!(counted.set(key("a"), &ready("True")).is_none());
        assert!(counted.set(key("b"), &ready("True")).is_none());
        assert_eq!(counted.sets.len(), 1, "one set for both");
        let old = counted.set(key("a"), &ready("False")).unwrap();
        assert_eq!(old.as_ref(), ready("True").as_slice());
        assert_eq!(counted.sets.len(), 2);
        drop(old);
        counted.set(key("b"), &[]);
        assert_eq!(counted.sets.len(), 1, "the set nobody has goes");
        assert_eq!(counted.by_object.len(), 1);
    }
}
