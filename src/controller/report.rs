//! Report: the status, written by server-side apply when it changed, and
//! the Events of one reconcile.

use futures::future;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, FIELD_MANAGER};
use crate::api::{AmiCopy, AmiCopyStatus};
use crate::ec2::Ec2;
use crate::error::{Error, Result};
use crate::plan::{self, Note, Recorded};

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
