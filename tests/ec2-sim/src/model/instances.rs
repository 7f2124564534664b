//! Instances, per account and region: launched from an image, stopped,
//! started and terminated. They exist so that an image can be seen in use
//! (`lastLaunchedTime`, DescribeInstances by `image-id`); nothing about them
//! runs, and every change of state is immediate.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::images::ImageState;
use super::query::{Filter, Page, among, check_page, matches_filters, named_ids, paginate};
use super::{Ctx, State, is_hex_id};
use crate::wire::{ApiError, ApiResult};

/// The states the simulator uses; EC2's passing ones (`pending`,
/// `stopping`, `shutting-down`) are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Running,
    Stopped,
    /// Still described, as EC2 does for a while; the simulator never
    /// forgets a terminated instance.
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Terminated => "terminated",
        }
    }

    /// EC2's state code ("InstanceState", Amazon EC2 API Reference).
    pub fn code(self) -> i32 {
        match self {
            Self::Running => 16,
            Self::Terminated => 48,
            Self::Stopped => 80,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub reservation_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub state: InstanceState,
    #[serde(with = "time::serde::rfc3339")]
    pub launch_time: OffsetDateTime,
    /// Its place among the instances its RunInstances call launched.
    pub ami_launch_index: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunInstances {
    pub image_id: String,
    pub min_count: i64,
    pub max_count: i64,
    pub instance_type: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceQuery {
    pub instance_ids: Vec<String>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

/// What StartInstances, StopInstances and TerminateInstances report for
/// each instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub instance_id: String,
    pub previous: InstanceState,
    pub current: InstanceState,
}

/// The most instances one RunInstances call launches here: a bound on
/// memory, in place of EC2's vCPU quotas.
const MAX_PER_LAUNCH: i64 = 1000;

fn check_instance_id(id: &str) -> ApiResult<()> {
    if is_hex_id(id, "i-") {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidInstanceID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"i-...\")"),
        ))
    }
}

fn not_found_instances(ids: &[&str]) -> ApiError {
    let message = match ids {
        [one] => format!("The instance ID '{one}' does not exist"),
        many => format!("The instance IDs '{}' do not exist", many.join(", ")),
    };
    ApiError::client("InvalidInstanceID.NotFound", message)
}

fn instance_filter_values(instance: &Instance, name: &str) -> Option<Vec<String>> {
    let one = |v: &str| Some(vec![v.to_string()]);
    match name {
        "instance-id" => one(&instance.id),
        "image-id" => one(&instance.image_id),
        "instance-state-name" => one(instance.state.as_str()),
        "instance-state-code" => one(&instance.state.code().to_string()),
        "instance-type" => one(&instance.instance_type),
        "reservation-id" => one(&instance.reservation_id),
        "owner-id" => one(&instance.owner),
        _ => None,
    }
}

impl State {
    /// Instance IDs of the caller's, checked: any malformed or unknown one
    /// fails the call, before anything changes.
    fn check_instances(&self, ctx: &Ctx, ids: &[String]) -> ApiResult<()> {
        for id in ids {
            check_instance_id(id)?;
        }
        let missing: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| {
                self.instances
                    .get(*id)
                    .is_none_or(|i| i.region != ctx.region() || i.owner != ctx.account())
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(not_found_instances(&missing))
        }
    }

    /// RunInstances: `MaxCount` instances, running at once, from an image
    /// the caller may launch and that is available. The image records the
    /// launch as its `lastLaunchedTime`.
    pub fn run_instances(&mut self, ctx: &Ctx, req: RunInstances) -> ApiResult<Vec<Instance>> {
        if req.min_count < 1 || req.max_count < req.min_count {
            return Err(ApiError::invalid_value(
                "MinCount",
                &req.min_count.to_string(),
                "MinCount must be at least 1 and at most MaxCount.",
            ));
        }
        if req.max_count > MAX_PER_LAUNCH {
            return Err(ApiError::client(
                "InstanceLimitExceeded",
                format!(
                    "You have requested more instances ({}) than your current instance limit of {MAX_PER_LAUNCH} allows.",
                    req.max_count
                ),
            ));
        }
        let image = self.usable_image(ctx, ctx.region(), &req.image_id)?;
        if image.state != ImageState::Available {
            return Err(ApiError::client(
                "InvalidAMIID.Unavailable",
                format!(
                    "The image id '[{}]' is not available: it is {}",
                    image.id,
                    image.state.as_str()
                ),
            ));
        }
        let image_id = image.id.clone();
        let reservation_id = self.new_id("r");
        let mut launched = Vec::new();
        for index in 0..req.max_count {
            let instance = Instance {
                id: self.new_id("i"),
                region: ctx.region().to_string(),
                owner: ctx.account().to_string(),
                reservation_id: reservation_id.clone(),
                image_id: image_id.clone(),
                instance_type: req
                    .instance_type
                    .clone()
                    .unwrap_or_else(|| "m1.small".to_string()),
                state: InstanceState::Running,
                launch_time: ctx.now,
                ami_launch_index: index,
            };
            self.instances.insert(instance.id.clone(), instance.clone());
            launched.push(instance);
        }
        if let Some(image) = self.images.get_mut(&image_id) {
            image.last_launched_time = Some(ctx.now);
        }
        Ok(launched)
    }

    /// StartInstances (`target` running), StopInstances (stopped) and
    /// TerminateInstances (terminated). A terminated instance can be
    /// neither started nor stopped; asking for the state an instance is
    /// already in changes nothing and is no error, as in EC2.
    pub fn change_instance_states(
        &mut self,
        ctx: &Ctx,
        ids: &[String],
        target: InstanceState,
    ) -> ApiResult<Vec<StateChange>> {
        if ids.is_empty() {
            return Err(ApiError::missing("InstanceId"));
        }
        self.check_instances(ctx, ids)?;
        if target != InstanceState::Terminated
            && let Some(id) = ids
                .iter()
                .find(|id| self.instances[*id].state == InstanceState::Terminated)
        {
            return Err(ApiError::client(
                "IncorrectInstanceState",
                format!(
                    "The instance '{id}' is not in a state from which it can be {}.",
                    if target == InstanceState::Running {
                        "started"
                    } else {
                        "stopped"
                    }
                ),
            ));
        }
        let mut changes = Vec::new();
        for id in ids {
            let instance = self.instances.get_mut(id).expect("checked above");
            changes.push(StateChange {
                instance_id: id.clone(),
                previous: instance.state,
                current: target,
            });
            instance.state = target;
        }
        Ok(changes)
    }

    /// DescribeInstances: the caller's instances in its region, terminated
    /// ones included, in ID order.
    pub fn describe_instances(
        &self,
        ctx: &Ctx,
        query: &InstanceQuery,
    ) -> ApiResult<(Vec<&Instance>, Option<String>)> {
        if !query.instance_ids.is_empty() && query.page != Page::default() {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                "The parameter instancesSet cannot be used with the parameter maxResults",
            ));
        }
        check_page(&query.page, 5..=1000)?;
        self.check_instances(ctx, &query.instance_ids)?;
        let named: Option<BTreeSet<&str>> =
            named_ids(&query.instance_ids, &query.filters, "instance-id");
        let mut selected = Vec::new();
        for (id, instance) in among(&self.instances, named.as_ref()) {
            if instance.region != ctx.region() || instance.owner != ctx.account() {
                continue;
            }
            if matches_filters(instance, &query.filters, instance_filter_values)? {
                selected.push((id, instance));
            }
        }
        paginate(selected, &query.page)
    }
}
