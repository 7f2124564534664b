//! One reconcile, as its stages: observe (what Kubernetes and EC2 say) →
//! plan (pure) → act (side effects, typed outcomes) → record (pure) →
//! report (status, Events, requeue). And what happens when one fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use rand::Rng;
use tracing::{debug, instrument, warn};

use super::cached::{self, CachedAmiCopy};
use super::{Context, act, cleanup, observe, report};
use crate::api::{AmiCopy, FINALIZER, PAUSED_ANNOTATION, PINNED_ANNOTATION};
use crate::config::Config;
use crate::ec2::Ec2;
use crate::error::{Error, Result};
use crate::plan::{self, Meta, Scopes, requeue};

#[instrument(skip_all, fields(object = %format!("{}/{}", cached.namespace().unwrap_or_default(), cached.name_any()), uid = cached.metadata.uid.as_deref().unwrap_or_default()))]
pub(super) async fn reconcile<E: Ec2>(
    cached: Arc<CachedAmiCopy>,
    ctx: Arc<Context<E>>,
) -> Result<Requeue> {
    let start = Instant::now();
    let obj = Arc::new(cached.read().map_err(Error::Unreadable)?);
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<AmiCopy> = Api::namespaced(ctx.client.clone(), &ns);
    let key = cached::key_of(obj.as_ref());
    let paused = obj
        .annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true");
    let res = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) if paused => pause(&obj, &api, &ctx, false).await,
            Finalizer::Apply(obj) => apply(&obj, &api, &ctx).await,
            // The finalizer stays until the object is resumed: the
            // clean-up is EC2 calls too.
            Finalizer::Cleanup(obj) if paused => {
                pause(&obj, &api, &ctx, true).await?;
                Err(Error::Paused)
            }
            Finalizer::Cleanup(obj) => cleanup::cleanup(&obj, &api, &ctx).await,
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

/// A paused object: no EC2 call at all, and its copies leave the tracker;
/// the status says it is paused. Resumed by a change (the annotation's
/// removal).
async fn pause<E: Ec2>(
    obj: &AmiCopy,
    api: &Api<AmiCopy>,
    ctx: &Context<E>,
    deleting: bool,
) -> Result<Requeue> {
    let key = cached::key_of(obj);
    if let Some(t) = &ctx.tracker {
        t.forget(&key);
    }
    let written = report::paused(obj, api, deleting).await?;
    ctx.superseding(&key, obj, written.as_ref());
    Ok(Requeue::await_change())
}

/// One pass over a live object.
async fn apply<E: Ec2>(obj: &AmiCopy, api: &Api<AmiCopy>, ctx: &Context<E>) -> Result<Requeue> {
    let key = cached::key_of(obj);
    // The watch has not brought this operator's last status write yet:
    // planning from this copy would only be refused at the write, after
    // asking EC2 for nothing. Look again in a moment.
    if ctx.is_superseded(&key, obj) {
        return Ok(Requeue::requeue(Duration::from_millis(200)));
    }
    let seen = report::first_status(obj, api).await?;
    ctx.superseding(&key, obj, seen.as_ref());
    let obj = seen.as_ref().unwrap_or(obj);
    let mut m = meta(obj, &ctx.config)?;
    m.governing = ctx.governing(&m.namespace);
    let scopes = Scopes::new(&obj.spec, obj.status.as_ref()).on_behalf_of(&m.namespace, &m.name);
    let observed = observe::observe(obj, &m, &scopes, ctx).await?;
    let now = Time(Timestamp::now());
    let plan = plan::plan(&obj.spec, &m, obj.status.as_ref(), &observed, &now);
    // Copies are recorded before they start: a copy whose image ID is lost
    // (the operator stopped before writing it) is still looked for.
    let written = report::write_ahead(obj, api, &plan, &now).await?;
    ctx.superseding(&key, obj, written.as_ref());
    let obj = written.as_ref().unwrap_or(obj);
    let acted = act::act(&plan, &m, &scopes, ctx).await;
    let previous = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let recorded = plan::record(plan, acted.outcomes, previous, &now);
    debug!(status = %plan::record::outline(&recorded.status), "recorded");
    let reported = report::report(obj, api, ctx, &recorded).await?;
    ctx.superseding(&key, obj, reported.as_ref());
    ctx.count_conditions(key, &recorded.status.conditions);
    // EC2 faults still back off, after the status says what is going on.
    if let Some(e) = acted
        .error
        .or_else(|| observed.transient_error().cloned().map(Error::from))
    {
        return Err(e);
    }
    let wait = requeue::after(
        &ctx.config,
        &obj.spec,
        &recorded.status,
        recorded.busy,
        &now,
    );
    Ok(Requeue::requeue(wait))
}

/// Exponential backoff with jitter, per object; throttling starts higher.
/// An object that cannot be read waits for a change instead.
pub(super) fn error_policy<E: Ec2>(
    obj: Arc<CachedAmiCopy>,
    err: &Error,
    ctx: Arc<Context<E>>,
) -> Requeue {
    if err.is_terminal() {
        warn!(error = %err, category = err.metric_label(), "reconcile failed; waiting for a change to the object");
        return Requeue::await_change();
    }
    let key = cached::key_of(obj.as_ref());
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

/// The object's identity and the settings the planner needs.
pub(super) fn meta(obj: &AmiCopy, config: &Config) -> Result<Meta> {
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
        listing_grace: config.listing_grace,
        governing: Vec::new(),
        ssm_prefix: config.ssm_parameter_prefix.clone(),
        namespace: obj
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?,
        name: obj.name_any(),
        uid: obj.uid().ok_or(Error::MissingField("metadata.uid"))?,
        generation: obj.meta().generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
