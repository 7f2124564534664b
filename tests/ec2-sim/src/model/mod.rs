//! Simulated EC2 resources and the rules that govern them.
//!
//! Everything here is plain data and functions over [`State`]: no clocks, no
//! sockets. The caller passes the time in, which keeps the semantics easy to
//! unit test. Each resource has its own module; this one holds the state they
//! share and who is asking.

mod consistency;
mod copies;
mod images;
mod instances;
mod kms;
mod launch_templates;
mod permissions;
mod protection;
mod query;
mod seed;
mod snapshots;
mod tags;
mod volumes;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;

use crate::config::SimConfig;
use crate::wire::{ApiError, ApiResult};

pub use copies::{CopyImage, CopyTask};
pub use images::{
    BlockDevice, DeviceRequest, EbsDevice, EbsRequest, Image, ImageQuery, ImageSource, ImageState,
    RegisterImage, SnapshotDeletion, StateReason, check_image_id, check_image_name,
};
pub use instances::{Instance, InstanceQuery, InstanceState, RunInstances, StateChange};
pub use kms::{default_ebs_key, resolve_kms_key};
pub use launch_templates::{
    CreateLaunchTemplate, CreateLaunchTemplateVersion, LaunchTemplate, LaunchTemplateVersion,
    TemplateRef, VersionQuery, VersionSpec, VersionView,
};
pub use permissions::{Permission, PermissionChange};
pub use protection::{COOLDOWN, DeregistrationProtection};
pub use query::{Filter, Page, wildcard};
pub use seed::SeedImage;
pub use snapshots::{Snapshot, SnapshotQuery, SnapshotState, check_snapshot_id};
pub use tags::{TagSpec, Tags};
pub use volumes::{CreateVolume, Volume};

use consistency::{LaggingTags, Tombstone};
use copies::TokenKey;

/// Who is calling, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub account: String,
    pub region: String,
}

/// What every operation needs besides the state itself.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    pub config: &'a SimConfig,
    pub caller: &'a Caller,
    pub now: OffsetDateTime,
}

impl Ctx<'_> {
    pub fn account(&self) -> &str {
        &self.caller.account
    }

    pub fn region(&self) -> &str {
        &self.caller.region
    }
}

/// All simulated resources, across every account and region.
#[derive(Clone, Debug)]
pub struct State {
    pub images: BTreeMap<String, Image>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub volumes: BTreeMap<String, Volume>,
    pub launch_templates: BTreeMap<String, LaunchTemplate>,
    pub instances: BTreeMap<String, Instance>,
    deregistered: BTreeSet<String>,
    tokens: HashMap<TokenKey, (CopyImage, String)>,
    rng: StdRng,
    // Indexes that keep tens of thousands of images from being scanned on
    // every call: image IDs by (tag key, tag value); the running copies by
    // when they finish; and how many run per (region, account).
    images_by_tag: HashMap<(String, String), BTreeSet<String>>,
    copying: BTreeSet<(OffsetDateTime, String)>,
    copies_in_flight: HashMap<(String, String), usize>,
    // What eventual consistency keeps from some calls for a while: new
    // resources by when they are known, tag changes filters do not see yet,
    // and deregistered images still described.
    propagating: HashMap<String, OffsetDateTime>,
    lagging_tags: HashMap<String, LaggingTags>,
    tombstones: BTreeMap<String, Tombstone>,
}

impl State {
    pub fn new(seed: u64) -> Self {
        Self {
            images: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            volumes: BTreeMap::new(),
            launch_templates: BTreeMap::new(),
            instances: BTreeMap::new(),
            deregistered: BTreeSet::new(),
            tokens: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            images_by_tag: HashMap::new(),
            copying: BTreeSet::new(),
            copies_in_flight: HashMap::new(),
            propagating: HashMap::new(),
            lagging_tags: HashMap::new(),
            tombstones: BTreeMap::new(),
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        let n: u128 = self.rng.random();
        format!("{prefix}-{:017x}", n & ((1u128 << 68) - 1))
    }
}

fn is_hex_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        (rest.len() == 8 || rest.len() == 17)
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn check_description(description: Option<&str>) -> ApiResult<()> {
    match description {
        Some(d) if d.chars().count() > 255 => Err(ApiError::invalid_value(
            "Description",
            d,
            "Length must be at most 255.",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod usage_tests;
