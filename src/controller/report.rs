//! Report: the status, written by server-side apply when it changed, and
//! the Events of one reconcile.

use futures::future;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

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
) -> Result<()> {
    write_status(api, obj, &recorded.status).await?;
    let notes = plan::merge_notes(&recorded.notes);
    future::join_all(notes.iter().map(|note| ctx.publish(obj, note))).await;
    Ok(())
}

/// Writes the status the plan leads to before any copy starts or any copy
/// is retired, when the plan does either: what a copy's ID or a retired
/// copy's snapshots are must survive the operator stopping half-way. The
/// status written, if a write was needed.
pub(super) async fn write_ahead(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    plan: &Plan,
    now: &Time,
) -> Result<Option<AmiCopyStatus>> {
    if !plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Copy { .. }))
    {
        return Ok(None);
    }
    let previous = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut status = plan.status.clone();
    plan::record::summarize(&mut status, plan.global.clone(), previous, now);
    if obj.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    write_status(api, obj, &status).await?;
    Ok(Some(status))
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
    status.conditions.retain(|c| c.type_ != status::DEGRADED);
    status.conditions.push(degraded);
    if let Err(e) = write_status(api, obj, &status).await {
        warn!(error = %e, "could not report a blocked clean-up in the status");
    }
    let note = Note::warning(reason::CLEANUP_BLOCKED, "", message);
    ctx.publish(obj, &note).await;
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
