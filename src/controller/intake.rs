//! Intake of the watch: objects are listed and watched untyped, and each is
//! checked to read as an AmiCopy before it reaches the cache, which keeps it
//! compact ([`CachedAmiCopy`]). An object that cannot be read is reported on
//! (a condition and an Event) and left alone until it changes.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{reflector, watcher};
use kube::{Resource, ResourceExt};
use rand::Rng;
use serde_json::json;
use tracing::warn;

use super::cached::CachedAmiCopy;
use super::{Context, FIELD_MANAGER, backoff};
use crate::api::{AmiCopy, AmiCopySpec, AmiCopyStatus};
use crate::ec2::Ec2;
use crate::error::{Error, Result};
use crate::status::{self, reason};

/// An object that does not read as an AmiCopy, and the parser's complaint.
pub(super) type Unreadable = (DynamicObject, String);

/// The cached form of a watch event. An object that does not read as an
/// AmiCopy goes to `unreadable` and out of the cache, so that nothing acts
/// on an earlier version of it.
pub(super) fn read_event(
    event: watcher::Event<CachedAmiCopy>,
    cache: &reflector::Store<CachedAmiCopy>,
    unreadable: &futures::channel::mpsc::UnboundedSender<Box<Unreadable>>,
) -> Option<watcher::Event<CachedAmiCopy>> {
    use watcher::Event as E;
    let read = |obj: CachedAmiCopy| match obj.read() {
        Ok(_) => Ok(obj),
        Err(e) => Err(Box::new((obj.untyped(), e.to_string()))),
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
pub(super) async fn report_unreadable<E: Ec2>(unread: Box<Unreadable>, ctx: &Context<E>) {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::cached::LAST_APPLIED;
    use super::*;

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
    fn watch_events_reach_the_cache_typed_and_unreadable_ones_leave_it() {
        use watcher::Event as E;
        let raw = |name: &str, spec: serde_json::Value| -> CachedAmiCopy {
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
        let mut writer = reflector::store::Writer::<CachedAmiCopy>::default();
        let cache = writer.as_reader();
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        let mut feed = |event: E<CachedAmiCopy>| {
            let typed = read_event(event, &cache, &tx);
            if let Some(typed) = &typed {
                writer.apply_watcher_event(typed);
            }
            typed
        };
        let key = |name: &str| ObjectRef::<CachedAmiCopy>::new(name).within("ns");

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
}
