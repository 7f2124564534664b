//! Publishing the current copies' IDs: the ConfigMap (server-side apply,
//! owned by the AmiCopy) and the SSM parameters of each region. Nothing
//! someone else owns is overwritten: a ConfigMap this object does not own,
//! or a parameter holding an ID this object never made, stops the whole
//! publication before anything is written.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
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
    if let Some((name, data)) = &p.config_map {
        let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &m.namespace);
        let cm = config_map(name, data, m);
        if let Err(why) = write_config_map(&configmaps, cm, m, p.config_map_written).await? {
            return Ok(Err(why));
        }
        info!(configmap = %name, "published");
    }
    for param in &p.parameters {
        let scope = scope_of(param);
        ctx.ec2
            .put_parameter(&scope, &param.name, &param.image_id)
            .await?;
        info!(region = %param.region, parameter = %param.name, image = %param.image_id, "published");
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

/// The ConfigMap of a publication, owned by the AmiCopy so that it goes with
/// it.
fn config_map(name: &str, data: &BTreeMap<String, String>, m: &Meta) -> ConfigMap {
    let owner = OwnerReference {
        api_version: AmiCopy::api_version(&()).into_owned(),
        kind: AmiCopy::kind(&()).into_owned(),
        name: m.name.clone(),
        uid: m.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(m.namespace.clone()),
            owner_references: Some(vec![owner]),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data.clone()),
        ..ConfigMap::default()
    }
}

/// Writes the ConfigMap: by server-side apply over one this object wrote
/// before; else created, and, when one of that name exists, applied over
/// only if this AmiCopy owns it. `Ok(Err(why))` when someone else does.
async fn write_config_map(
    api: &Api<ConfigMap>,
    cm: ConfigMap,
    m: &Meta,
    written: bool,
) -> Result<std::result::Result<(), String>> {
    let name = cm.name_any();
    if !written {
        match api.create(&PostParams::default(), &cm).await {
            Ok(_) => return Ok(Ok(())),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api.get(&name).await.map_err(Error::Kube)?;
                if !owned(&existing, &m.uid) {
                    return Ok(Err(format!(
                        "ConfigMap {name} exists and is not owned by this AmiCopy; it is left untouched"
                    )));
                }
            }
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    // k8s-openapi writes the apiVersion and kind server-side apply needs.
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(Ok(()))
}
