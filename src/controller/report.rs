//! Report: the status, written by server-side apply when it changed, and
//! the Events of one reconcile.

use futures::future;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::cached::CachedAmiCopy;
use super::{Context, FIELD_MANAGER};
use crate::api::{AmiCopy, AmiCopyStatus};
use crate::ec2::Ec2;
use crate::error::{Error, Result};
use crate::plan::{self, Action, Note, Plan, Recorded};
use crate::status::{self, reason};

/// Writes the status when it changed, then publishes the Events: one per
/// kind of news.
pub(super) async fn report<E: Ec2>(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    ctx: &Context<E>,
    recorded: &Recorded,
) -> Result<Option<AmiCopy>> {
    let written = write_status(api, obj, &recorded.status, true).await?;
    let notes = plan::merge_notes(&recorded.notes);
    future::join_all(notes.iter().map(|note| ctx.publish(obj, note))).await;
    Ok(written)
}

/// Writes the status the plan leads to before any copy starts or any copy
/// is retired, when the plan does either: what a copy's ID or a retired
/// copy's snapshots are must survive the operator stopping half-way. The
/// object as written, if a write was needed.
pub(super) async fn write_ahead(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    plan: &Plan,
    now: &Time,
) -> Result<Option<AmiCopy>> {
    if !plan.actions.iter().any(|a| {
        matches!(
            a,
            Action::Copy { .. } | Action::Retire { .. } | Action::RetireMoved { .. }
        )
    }) {
        return Ok(None);
    }
    let previous = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut status = plan.status.clone();
    plan::record::summarize(&mut status, plan.global.clone(), previous, now);
    // Written even when unchanged: the write is also the proof that this
    // pass read the object as it is (a copy of it the watch had not brought
    // up to date would start a copy again, or retire one twice).
    apply_status(api, obj, &status).await.map(Some)
}

/// An object seen for the first time gets a status at once (observed
/// generation, `Reconciling`), before EC2 is asked anything; the object as
/// written, if it was.
pub(super) async fn first_status(obj: &AmiCopy, api: &Api<AmiCopy>) -> Result<Option<AmiCopy>> {
    if obj.status.is_some() {
        return Ok(None);
    }
    let status = AmiCopyStatus {
        observed_generation: obj.metadata.generation,
        conditions: status::first(obj.metadata.generation, &Time(Timestamp::now())),
        ..AmiCopyStatus::default()
    };
    write_status(api, obj, &status, false).await
}

/// A paused object: `Paused` (and `Reconciling` false) in the status, the
/// rest as it was. The object as written, if it was.
pub(super) async fn paused(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    deleting: bool,
) -> Result<Option<AmiCopy>> {
    let message = if deleting {
        "paused: the clean-up of the copies waits until the annotation amicopy.dev/paused is removed"
    } else {
        "paused: no EC2 call is made until the annotation amicopy.dev/paused is removed"
    };
    let mut status = obj.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let generation = obj.metadata.generation;
    let paused = [(status::PAUSED, true), (status::RECONCILING, false)].map(|(type_, on)| {
        let c = &status.conditions;
        status::condition(
            c,
            type_,
            on,
            reason::PAUSED,
            message.into(),
            generation,
            &now,
        )
    });
    replace_conditions(&mut status, paused);
    write_status(api, obj, &status, false).await
}

/// The finalizer cannot finish: `Degraded` says where and why (a status
/// write only when that changes), and a Warning Event; the other conditions
/// and the targets recorded stay as they were.
pub(super) async fn cleanup_blocked<E: Ec2>(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    ctx: &Context<E>,
    why: &str,
) {
    let message = format!(
        "deletion waits for the clean-up of the copies: {why}; fix the cause (see the reason) and it goes on by itself"
    );
    let mut status = obj.status.clone().unwrap_or_default();
    let degraded = status::condition(
        &status.conditions,
        status::DEGRADED,
        true,
        reason::CLEANUP_BLOCKED,
        message.clone(),
        obj.metadata.generation,
        &Time(Timestamp::now()),
    );
    replace_conditions(&mut status, [degraded]);
    if let Err(e) = write_status(api, obj, &status, true).await {
        warn!(error = %e, "could not report a blocked clean-up in the status");
    }
    let note = Note::warning(reason::CLEANUP_BLOCKED, "", message);
    ctx.publish(obj, &note).await;
}

/// Puts `conditions` in the status in place of those of the same types; the
/// others stay as they were.
fn replace_conditions(status: &mut AmiCopyStatus, conditions: impl IntoIterator<Item = Condition>) {
    for condition in conditions {
        status.conditions.retain(|c| c.type_ != condition.type_);
        status.conditions.push(condition);
    }
}

/// Writes status by server-side apply, unless nothing changed; the object
/// as written, if a write was needed.
///
/// The write holds only if the object is still the one this pass read (its
/// resourceVersion): a status built on a copy the watch had not brought up
/// to date would overwrite what an earlier pass recorded, such as a copy's
/// image ID, and that is [`Error::Stale`]. With `after_acting`, the pass has
/// acted and its outcomes are facts: if only the spec or metadata changed
/// meanwhile (the status is still the one read), they are written anyway.
async fn write_status(
    api: &Api<AmiCopy>,
    obj: &AmiCopy,
    status: &AmiCopyStatus,
    after_acting: bool,
) -> Result<Option<AmiCopy>> {
    if obj.status.as_ref() == Some(status) {
        return Ok(None);
    }
    match apply_status(api, obj, status).await {
        Err(Error::Stale) if after_acting => {
            let fresh = api.get(&obj.name_any()).await.map_err(Error::Kube)?;
            if fresh.metadata.uid != obj.metadata.uid || fresh.status != obj.status {
                return Err(Error::Stale);
            }
            apply_status(api, &fresh, status).await.map(Some)
        }
        res => res.map(Some),
    }
}

/// One status write, on condition that `obj` is the object as it is now.
async fn apply_status(
    api: &Api<AmiCopy>,
    obj: &AmiCopy,
    status: &AmiCopyStatus,
) -> Result<AmiCopy> {
    let mut patch = json!({
        "apiVersion": "amicopy.dev/v1alpha1",
        "kind": "AmiCopy",
        "status": status,
    });
    if let Some(version) = obj.resource_version() {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    // The object written comes back read as the cache reads it: its
    // managedFields are skipped, not parsed.
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let compact: Api<CachedAmiCopy> = Api::namespaced(api.clone().into_client(), &ns);
    compact
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(ae) if ae.code == 409 => Error::Stale,
            e => Error::Kube(e),
        })?
        .read()
        .map_err(Error::Unreadable)
}

impl<E: Ec2> Context<E> {
    /// Publishes a note as an Event about `obj`.
    pub(super) async fn publish(&self, obj: &AmiCopy, note: &Note) {
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
