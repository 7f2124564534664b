//! Images placed straight into the state, as fixtures for tests.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::State;
use super::images::{BlockDevice, EbsDevice, Image, ImageState};
use super::kms::default_ebs_key;
use super::permissions::Permission;
use super::protection::DeregistrationProtection;
use super::snapshots::{Snapshot, SnapshotState};
use super::tags::Tags;
use crate::config::SimConfig;

/// An image to place directly into the state, bypassing the API's rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeedImage {
    pub region: String,
    pub name: String,
    /// Defaults to the simulator's default account.
    pub owner: Option<String>,
    pub description: Option<String>,
    pub architecture: String,
    pub virtualization_type: String,
    /// `ebs` or `instance-store`.
    pub root_device_type: String,
    pub volume_size: i64,
    pub encrypted: bool,
    /// Defaults to the account's `aws/ebs` key when `encrypted` is set.
    pub kms_key_id: Option<String>,
    pub image_location: Option<String>,
    pub billing_products: Vec<String>,
    pub tags: Tags,
    pub launch_permissions: Vec<Permission>,
    pub state: Option<ImageState>,
}

impl Default for SeedImage {
    fn default() -> Self {
        Self {
            region: "us-east-1".to_string(),
            name: String::new(),
            owner: None,
            description: None,
            architecture: "x86_64".to_string(),
            virtualization_type: "hvm".to_string(),
            root_device_type: "ebs".to_string(),
            volume_size: 8,
            encrypted: false,
            kms_key_id: None,
            image_location: None,
            billing_products: Vec::new(),
            tags: Tags::new(),
            launch_permissions: Vec::new(),
            state: None,
        }
    }
}

impl SeedImage {
    pub fn new(region: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            name: name.into(),
            ..Self::default()
        }
    }
}

impl State {
    /// Places an image (and its root snapshot) straight into the state.
    pub fn seed_image(
        &mut self,
        config: &SimConfig,
        seed: SeedImage,
        now: OffsetDateTime,
    ) -> String {
        let owner = seed
            .owner
            .clone()
            .unwrap_or_else(|| config.default_account.clone());
        let id = self.new_id("ami");
        let instance_store = seed.root_device_type == "instance-store";
        let (root_device_name, block_devices) = if instance_store {
            (None, Vec::new())
        } else {
            let root = self.seed_root_device(&seed, &owner, &id, now);
            (Some(root.device_name.clone()), vec![root])
        };
        let image_location = seed
            .image_location
            .unwrap_or_else(|| format!("{owner}/{}", seed.name));
        let image = Image {
            id: id.clone(),
            region: seed.region,
            owner,
            name: seed.name,
            description: seed.description,
            state: seed.state.unwrap_or(ImageState::Available),
            state_reason: None,
            creation_date: now,
            architecture: seed.architecture,
            virtualization_type: seed.virtualization_type,
            root_device_type: seed.root_device_type,
            root_device_name,
            image_location,
            block_devices,
            tags: seed.tags,
            launch_permissions: seed.launch_permissions,
            billing_products: seed.billing_products,
            ena_support: true,
            source: None,
            deprecation_time: None,
            copy: None,
            deregistration_protection: DeregistrationProtection::Disabled,
            last_launched_time: None,
        };
        self.insert_image(image);
        id
    }

    /// The root device of a seeded EBS image, with its snapshot.
    fn seed_root_device(
        &mut self,
        seed: &SeedImage,
        owner: &str,
        image_id: &str,
        now: OffsetDateTime,
    ) -> BlockDevice {
        let kms_key_id = seed.encrypted.then(|| {
            seed.kms_key_id
                .clone()
                .unwrap_or_else(|| default_ebs_key(owner, &seed.region))
        });
        let snapshot_id = self.new_id("snap");
        self.snapshots.insert(
            snapshot_id.clone(),
            Snapshot {
                id: snapshot_id.clone(),
                region: seed.region.clone(),
                owner: owner.to_string(),
                volume_id: "vol-ffffffff".to_string(),
                volume_size: seed.volume_size,
                description: format!("Created for seeded image {image_id}"),
                state: SnapshotState::Completed,
                start_time: now,
                encrypted: seed.encrypted,
                kms_key_id: kms_key_id.clone(),
                tags: Tags::new(),
                create_volume_permissions: Vec::new(),
                completion_duration_minutes: None,
            },
        );
        BlockDevice {
            device_name: "/dev/xvda".to_string(),
            virtual_name: None,
            ebs: Some(EbsDevice {
                snapshot_id: Some(snapshot_id),
                volume_size: seed.volume_size,
                delete_on_termination: true,
                volume_type: "gp3".to_string(),
                encrypted: seed.encrypted,
                kms_key_id,
            }),
        }
    }
}
