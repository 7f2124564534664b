//! Publishing the current copies' IDs: the ConfigMap (server-side apply,
//! owned by the AmiCopy) and the SSM parameters of each region. Nothing
//! someone else owns is overwritten: a ConfigMap this object does not own,
//! or a parameter holding an ID this object never made, stops the whole
//! publication before anything is written.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use tracing::info;

use super::{Context, FIELD_MANAGER};
use crate::api::{AmiCopy, PublishedParameter};
use crate::ec2::{Ec2, Scope};
use crate::error::{Error, Result};
use crate::plan::publish::Publication;
use crate::plan::{Meta, Outcome, Scopes};

/// Performs a publication: checks everything it would overwrite, then
/// writes the parameters and the ConfigMap, and withdraws stale parameters.
pub(super) async fn publish<E: Ec2>(
    p: &Publication,
    m: &Meta,
    scopes: &Scopes,
    ctx: &Context<E>,
) -> (Outcome, Option<Error>) {
    match try_publish(p, m, scopes, ctx).await {
        Ok(Ok(())) => (Outcome::Published(p.record.clone()), None),
        Ok(Err(conflict)) => (Outcome::PublishBlocked(conflict), None),
        Err(e) => (Outcome::Done, Some(e)),
    }
}

/// `Ok(Err(why))` when something to write belongs to someone else.
async fn try_publish<E: Ec2>(
    p: &Publication,
    m: &Meta,
    scopes: &Scopes,
    ctx: &Context<E>,
) -> Result<std::result::Result<(), String>> {
    let scope_of = |param: &PublishedParameter| scopes.of(&param.region);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &m.namespace);
    if let Some((name, _)) = &p.config_map
        && let Some(existing) = configmaps.get_opt(name).await.map_err(Error::Kube)?
        && !owned(&existing, &m.uid)
    {
        return Ok(Err(format!(
            "ConfigMap {name} exists and is not owned by this AmiCopy; it is left untouched"
        )));
    }
    for param in &p.parameters {
        let scope = scope_of(param);
        let value = ctx.ec2.get_parameter(&scope, &param.name).await?;
        if let Some(v) = value.filter(|v| !p.ours.contains(v)) {
            return Ok(Err(format!(
                "SSM parameter {} in {scope} holds {v}, which this AmiCopy did not make; it is left untouched",
                param.name
            )));
        }
    }
    for param in &p.parameters {
        let scope = scope_of(param);
        ctx.ec2
            .put_parameter(&scope, &param.name, &param.image_id)
            .await?;
        info!(region = %param.region, parameter = %param.name, image = %param.image_id, "published");
    }
    if let Some((name, data)) = &p.config_map {
        apply_config_map(&configmaps, name, data, m).await?;
    }
    for param in &p.stale {
        let scope = recorded_scope(param, m);
        withdraw(&ctx.ec2, &scope, &param.name, &p.ours).await?;
    }
    Ok(Ok(()))
}

/// The account a parameter was written in, as the status recorded it.
pub(super) fn recorded_scope(param: &PublishedParameter, m: &Meta) -> Scope {
    Scope::through(
        &param.region,
        param.role_arn.as_deref(),
        param.external_id.as_deref(),
    )
    .on_behalf_of(&m.namespace, &m.name)
}

/// Deletes a parameter this object wrote, read fresh: only while it still
/// holds one of `ours`.
pub(super) async fn withdraw<E: Ec2>(
    ec2: &E,
    scope: &Scope,
    name: &str,
    ours: &BTreeSet<String>,
) -> Result<()> {
    match ec2.get_parameter(scope, name).await? {
        Some(v) if ours.contains(&v) => {
            ec2.delete_parameter(scope, name).await?;
            info!(region = %scope.region, parameter = %name, "withdrawn");
        }
        Some(v) => {
            info!(region = %scope.region, parameter = %name, value = %v, "not withdrawn: it holds an image this object did not make");
        }
        None => {}
    }
    Ok(())
}

/// Whether the AmiCopy `uid` owns the ConfigMap.
fn owned(cm: &ConfigMap, uid: &str) -> bool {
    cm.owner_references().iter().any(|o| o.uid == uid)
}

/// Writes the ConfigMap by server-side apply, owned by the AmiCopy so that
/// it goes with it.
async fn apply_config_map(
    api: &Api<ConfigMap>,
    name: &str,
    data: &BTreeMap<String, String>,
    m: &Meta,
) -> Result<()> {
    let owner = OwnerReference {
        api_version: AmiCopy::api_version(&()).into_owned(),
        kind: AmiCopy::kind(&()).into_owned(),
        name: m.name.clone(),
        uid: m.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": m.namespace,
            "ownerReferences": [owner],
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "data": data,
    });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(cm),
    )
    .await
    .map_err(Error::Kube)?;
    info!(configmap = %name, "published");
    Ok(())
}
