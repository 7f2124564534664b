//! Simulated EC2 resources and the rules that govern them.
//!
//! Everything here is plain data and functions over [`State`]: no clocks, no
//! sockets. The caller passes the time in, which keeps the semantics easy to
//! unit test.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::SimConfig;
use crate::wire::{ApiError, ApiResult};

pub type Tags = BTreeMap<String, String>;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Pending,
    Available,
    Failed,
    Disabled,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Available => "available",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Error => "error",
        }
    }
}

/// One entry of a launch or create-volume permission list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Permission {
    UserId(String),
    Group(String),
    OrganizationArn(String),
    OrganizationalUnitArn(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReason {
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsDevice {
    pub snapshot_id: Option<String>,
    pub volume_size: i64,
    pub delete_on_termination: bool,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub device_name: String,
    pub virtual_name: Option<String>,
    pub ebs: Option<EbsDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    pub image_id: String,
    pub region: String,
}

/// A copy in flight: when it ends, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTask {
    #[serde(with = "time::serde::rfc3339")]
    pub ready_at: OffsetDateTime,
    pub failure: Option<StateReason>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub name: String,
    pub description: Option<String>,
    pub state: ImageState,
    pub state_reason: Option<StateReason>,
    #[serde(with = "time::serde::rfc3339")]
    pub creation_date: OffsetDateTime,
    pub architecture: String,
    pub virtualization_type: String,
    pub root_device_type: String,
    pub root_device_name: Option<String>,
    pub image_location: String,
    pub block_devices: Vec<BlockDevice>,
    pub tags: Tags,
    pub launch_permissions: Vec<Permission>,
    pub billing_products: Vec<String>,
    pub ena_support: bool,
    pub source: Option<ImageSource>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deprecation_time: Option<OffsetDateTime>,
    pub copy: Option<CopyTask>,
}

impl Image {
    pub fn is_public(&self) -> bool {
        self.launch_permissions
            .contains(&Permission::Group("all".to_string()))
    }

    pub fn is_ebs(&self) -> bool {
        self.root_device_type == "ebs"
    }

    pub fn snapshot_ids(&self) -> impl Iterator<Item = &str> {
        self.block_devices
            .iter()
            .filter_map(|d| d.ebs.as_ref()?.snapshot_id.as_deref())
    }

    /// Whether `account` may see and launch (and so copy) this image.
    pub fn usable_by(&self, account: &str) -> bool {
        self.owner == account
            || self.is_public()
            || self
                .launch_permissions
                .contains(&Permission::UserId(account.to_string()))
    }

    pub fn is_deprecated(&self, now: OffsetDateTime) -> bool {
        self.deprecation_time.is_some_and(|t| t <= now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub volume_id: String,
    pub volume_size: i64,
    pub description: String,
    pub state: SnapshotState,
    #[serde(with = "time::serde::rfc3339")]
    pub start_time: OffsetDateTime,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tags: Tags,
    pub create_volume_permissions: Vec<Permission>,
    pub completion_duration_minutes: Option<i64>,
}

impl Snapshot {
    pub fn usable_by(&self, account: &str) -> bool {
        self.owner == account
            || self.create_volume_permissions.iter().any(|p| match p {
                Permission::UserId(id) => id == account,
                Permission::Group(g) => g == "all",
                _ => false,
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub availability_zone: String,
    pub size: i64,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub snapshot_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub create_time: OffsetDateTime,
    pub tags: Tags,
}

/// Tags requested for one resource type (`TagSpecification.N`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSpec {
    pub resource_type: String,
    pub tags: Vec<(String, String)>,
}

/// A filter over describe results: any value may match (`*` and `?` work).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageQuery {
    pub image_ids: Vec<String>,
    pub owners: Vec<String>,
    pub executable_by: Vec<String>,
    pub filters: Vec<Filter>,
    pub include_deprecated: bool,
    pub page: Page,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub snapshot_ids: Vec<String>,
    pub owners: Vec<String>,
    pub restorable_by: Vec<String>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateVolume {
    pub availability_zone: String,
    pub size: Option<i64>,
    pub snapshot_id: Option<String>,
    pub volume_type: Option<String>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tag_specs: Vec<TagSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EbsRequest {
    pub snapshot_id: Option<String>,
    pub volume_size: Option<i64>,
    pub delete_on_termination: Option<bool>,
    pub volume_type: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRequest {
    pub device_name: String,
    pub virtual_name: Option<String>,
    pub no_device: bool,
    pub ebs: Option<EbsRequest>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterImage {
    pub name: String,
    pub description: Option<String>,
    pub image_location: Option<String>,
    pub architecture: Option<String>,
    pub virtualization_type: Option<String>,
    pub root_device_name: Option<String>,
    pub block_devices: Vec<DeviceRequest>,
    pub billing_products: Vec<String>,
    pub ena_support: bool,
    pub tag_specs: Vec<TagSpec>,
}

/// The parameters of `CopyImage`; equality decides ClientToken replays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyImage {
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: Option<String>,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    pub client_token: Option<String>,
    pub copy_image_tags: bool,
    pub tag_specs: Vec<TagSpec>,
    pub snapshot_copy_completion_minutes: Option<i64>,
}

/// A launch-permission or create-volume-permission change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermissionChange {
    pub add: Vec<Permission>,
    pub remove: Vec<Permission>,
}

/// Outcome of one snapshot deletion during `DeregisterImage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDeletion {
    pub snapshot_id: String,
    pub return_code: &'static str,
}

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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    account: String,
    region: String,
    token: String,
}

/// All simulated resources, across every account and region.
#[derive(Clone, Debug)]
pub struct State {
    pub images: BTreeMap<String, Image>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub volumes: BTreeMap<String, Volume>,
    deregistered: BTreeSet<String>,
    tokens: HashMap<TokenKey, (CopyImage, String)>,
    rng: StdRng,
    // Indexes that keep tens of thousands of images from being scanned on
    // every call: image IDs by (tag key, tag value); the running copies by
    // when they finish; and how many run per (region, account).
    images_by_tag: HashMap<(String, String), BTreeSet<String>>,
    copying: BTreeSet<(OffsetDateTime, String)>,
    copies_in_flight: HashMap<(String, String), usize>,
}

pub(crate) fn not_found_image(ids: &[&str]) -> ApiError {
    let message = match ids {
        [one] => format!("The image id '[{one}]' does not exist"),
        many => format!("The image ids '[{}]' do not exist", many.join(", ")),
    };
    ApiError::client("InvalidAMIID.NotFound", message)
}

fn not_found_snapshot(id: &str) -> ApiError {
    ApiError::client(
        "InvalidSnapshot.NotFound",
        format!("The snapshot '{id}' does not exist."),
    )
}

fn is_hex_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        (rest.len() == 8 || rest.len() == 17)
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

pub fn check_image_id(id: &str) -> ApiResult<()> {
    if is_hex_id(id, "ami-") {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidAMIID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"ami-...\")"),
        ))
    }
}

pub fn check_snapshot_id(id: &str) -> ApiResult<()> {
    if is_hex_id(id, "snap-") {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidSnapshotID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"snap-...\")"),
        ))
    }
}

/// AMI names: 3 to 128 characters from a restricted set.
pub fn check_image_name(name: &str) -> ApiResult<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    let len = name.chars().count();
    if !(3..=128).contains(&len) {
        return Err(ApiError::client(
            "InvalidAMIName.Malformed",
            format!(
                "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, '(', ')', '.', '-', '/' and '_': {name}"
            ),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(ApiError::client(
            "InvalidAMIName.Malformed",
            format!(
                "Character sets beyond ASCII are not supported, and '{bad}' is not allowed in AMI names: {name}"
            ),
        ));
    }
    Ok(())
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

fn check_tags<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> ApiResult<()> {
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > 128 {
            return Err(ApiError::invalid_value(
                "tag:key",
                key,
                "Tag keys must be between 1 and 128 characters.",
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(ApiError::invalid_value(
                "tag:key",
                key,
                "Tag keys starting with 'aws:' are reserved for internal use",
            ));
        }
        if value.chars().count() > 256 {
            return Err(ApiError::invalid_value(
                "tag:value",
                value,
                "Tag values may be at most 256 characters.",
            ));
        }
    }
    Ok(())
}

fn merge_tags(target: &mut Tags, new: impl IntoIterator<Item = (String, String)>) -> ApiResult<()> {
    let mut merged = target.clone();
    merged.extend(new);
    check_tags(&merged)?;
    if merged.len() > 50 {
        return Err(ApiError::client(
            "TagLimitExceeded",
            "The maximum number of tags per resource (50) has been reached.",
        ));
    }
    *target = merged;
    Ok(())
}

/// Tags for `resource_type` from TagSpecifications, rejecting other types.
fn tags_for(specs: &[TagSpec], allowed: &[&str], resource_type: &str) -> ApiResult<Tags> {
    let mut tags = Tags::new();
    for spec in specs {
        if !allowed.contains(&spec.resource_type.as_str()) {
            return Err(ApiError::invalid_value(
                "ResourceType",
                &spec.resource_type,
                "This resource type is not taggable on this operation.",
            ));
        }
        if spec.resource_type == resource_type {
            tags.extend(spec.tags.iter().cloned());
        }
    }
    check_tags(&tags)?;
    Ok(tags)
}

/// Glob match with EC2's filter wildcards: `*` any run, `?` one character.
pub fn wildcard(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some('\\') if p.get(pi + 1) == Some(&v[vi]) => {
                pi += 2;
                vi += 1;
            }
            Some('?') => {
                pi += 1;
                vi += 1;
            }
            Some('*') => {
                star = Some((pi, vi));
                pi += 1;
            }
            Some(c) if *c == v[vi] => {
                pi += 1;
                vi += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    pi = sp + 1;
                    vi = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The IDs a query names: its ID list, or else the values of an `id_filter`
/// filter without wildcards. `None` when it names none.
fn named_ids<'a>(
    ids: &'a [String],
    filters: &'a [Filter],
    id_filter: &str,
) -> Option<BTreeSet<&'a str>> {
    if !ids.is_empty() {
        return Some(ids.iter().map(String::as_str).collect());
    }
    filters
        .iter()
        .find(|f| f.name == id_filter && f.values.iter().all(|v| is_literal(v)))
        .map(|f| f.values.iter().map(String::as_str).collect())
}

/// The entries of `all` with the given IDs, in ID order; all of them when
/// `ids` is `None`.
fn among<'a: 'b, 'b, T>(
    all: &'a BTreeMap<String, T>,
    ids: Option<&'b BTreeSet<&'b str>>,
) -> Box<dyn Iterator<Item = (&'a String, &'a T)> + 'b> {
    match ids {
        Some(ids) => Box::new(ids.iter().filter_map(|id| all.get_key_value(*id))),
        None => Box::new(all.iter()),
    }
}

/// Whether a filter value matches only itself (no `*`, `?` or escape).
fn is_literal(value: &str) -> bool {
    !value.contains(['*', '?', '\\'])
}

fn tag_filter_values(tags: &Tags, name: &str) -> Option<Vec<String>> {
    if let Some(key) = name.strip_prefix("tag:") {
        return Some(tags.get(key).cloned().into_iter().collect());
    }
    match name {
        "tag-key" => Some(tags.keys().cloned().collect()),
        "tag-value" => Some(tags.values().cloned().collect()),
        _ => None,
    }
}

fn image_filter_values(image: &Image, name: &str) -> Option<Vec<String>> {
    let one = |v: &str| Some(vec![v.to_string()]);
    if let Some(values) = tag_filter_values(&image.tags, name) {
        return Some(values);
    }
    let ebs = || image.block_devices.iter().filter_map(|d| d.ebs.as_ref());
    match name {
        "image-id" => one(&image.id),
        "name" => one(&image.name),
        "state" => one(image.state.as_str()),
        "owner-id" => one(&image.owner),
        "description" => Some(image.description.clone().into_iter().collect()),
        "architecture" => one(&image.architecture),
        "virtualization-type" => one(&image.virtualization_type),
        "root-device-type" => one(&image.root_device_type),
        "root-device-name" => Some(image.root_device_name.clone().into_iter().collect()),
        "image-type" => one("machine"),
        "is-public" => one(&image.is_public().to_string()),
        "manifest-location" => one(&image.image_location),
        "source-image-id" => Some(image.source.iter().map(|s| s.image_id.clone()).collect()),
        "source-image-region" => Some(image.source.iter().map(|s| s.region.clone()).collect()),
        "block-device-mapping.snapshot-id" => {
            Some(ebs().filter_map(|e| e.snapshot_id.clone()).collect())
        }
        "block-device-mapping.encrypted" => Some(ebs().map(|e| e.encrypted.to_string()).collect()),
        "block-device-mapping.volume-type" => Some(ebs().map(|e| e.volume_type.clone()).collect()),
        "product-code" => Some(image.billing_products.clone()),
        _ => None,
    }
}

fn snapshot_filter_values(snapshot: &Snapshot, name: &str) -> Option<Vec<String>> {
    let one = |v: &str| Some(vec![v.to_string()]);
    if let Some(values) = tag_filter_values(&snapshot.tags, name) {
        return Some(values);
    }
    match name {
        "snapshot-id" => one(&snapshot.id),
        "owner-id" => one(&snapshot.owner),
        "status" => one(snapshot.state.as_str()),
        "volume-id" => one(&snapshot.volume_id),
        "volume-size" => one(&snapshot.volume_size.to_string()),
        "description" => one(&snapshot.description),
        "encrypted" => one(&snapshot.encrypted.to_string()),
        "kms-key-id" => Some(snapshot.kms_key_id.clone().into_iter().collect()),
        _ => None,
    }
}

fn matches_filters<T>(
    item: &T,
    filters: &[Filter],
    values_of: impl Fn(&T, &str) -> Option<Vec<String>>,
) -> ApiResult<bool> {
    for filter in filters {
        let values = values_of(item, &filter.name).ok_or_else(|| {
            ApiError::client(
                "InvalidParameterValue",
                format!("The filter '{}' is invalid", filter.name),
            )
        })?;
        let hit = filter
            .values
            .iter()
            .any(|pattern| values.iter().any(|v| wildcard(pattern, v)));
        if !hit {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Ids sorted; a page starts after the id the token names.
fn paginate<'a, T>(
    items: Vec<(&'a String, &'a T)>,
    page: &Page,
) -> ApiResult<(Vec<&'a T>, Option<String>)> {
    let start = match &page.next_token {
        None => 0,
        Some(token) => {
            let after = hex::decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::client(
                        "InvalidPaginationToken",
                        format!("The pagination token '{token}' is invalid"),
                    )
                })?;
            items.partition_point(|(id, _)| id.as_str() <= after.as_str())
        }
    };
    let rest = &items[start..];
    match page.max_results {
        Some(max) if (max as usize) < rest.len() => {
            let max = max as usize;
            let token = hex::encode(rest[max - 1].0);
            Ok((rest[..max].iter().map(|(_, t)| *t).collect(), Some(token)))
        }
        _ => Ok((rest.iter().map(|(_, t)| *t).collect(), None)),
    }
}

fn check_page(page: &Page) -> ApiResult<()> {
    match page.max_results {
        Some(n) if !(1..=1000).contains(&n) => Err(ApiError::invalid_value(
            "MaxResults",
            &n.to_string(),
            "Must be between 1 and 1000.",
        )),
        _ => Ok(()),
    }
}

fn resolve_owners(owners: &[String], account: &str) -> Vec<String> {
    owners
        .iter()
        .map(|o| {
            if o == "self" {
                account.to_string()
            } else {
                o.clone()
            }
        })
        .collect()
}

/// A stable, UUID-shaped key id derived from a name.
fn derived_key_id(seed: &str) -> String {
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The ARN of the AWS-managed `aws/ebs` key of an account in a region.
pub fn default_ebs_key(account: &str, region: &str) -> String {
    let id = derived_key_id(&format!("aws/ebs/{account}/{region}"));
    format!("arn:aws:kms:{region}:{account}:key/{id}")
}

/// Turns a key id, alias, key ARN or alias ARN into the key ARN EC2 records.
pub fn resolve_kms_key(key: &str, account: &str, region: &str) -> ApiResult<String> {
    let invalid = |why: &str| ApiError::invalid_value("KmsKeyId", key, why);
    let (key_region, key_account, resource) = match key.strip_prefix("arn:aws:kms:") {
        Some(rest) => {
            let parts: Vec<&str> = rest.splitn(3, ':').collect();
            let [r, a, res] = parts[..] else {
                return Err(invalid("Not a valid KMS key ARN."));
            };
            (r, a, res)
        }
        None => (region, account, key),
    };
    if key_region != region {
        return Err(ApiError::client(
            "InvalidParameterValue",
            format!(
                "KMS key {key} is in region {key_region}; a copy to {region} needs a key in {region}"
            ),
        ));
    }
    if let Some(alias) = resource.strip_prefix("alias/") {
        if alias == "aws/ebs" {
            return Ok(default_ebs_key(key_account, region));
        }
        let id = derived_key_id(&format!("{alias}/{key_account}/{region}"));
        return Ok(format!("arn:aws:kms:{region}:{key_account}:key/{id}"));
    }
    let id = resource.strip_prefix("key/").unwrap_or(resource);
    let uuid_like = id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let multi_region = id.starts_with("mrk-") && id.len() > 4;
    if !(uuid_like || multi_region) {
        return Err(invalid("Not a valid KMS key id, alias or ARN."));
    }
    Ok(format!("arn:aws:kms:{region}:{key_account}:key/{id}"))
}

impl State {
    pub fn new(seed: u64) -> Self {
        Self {
            images: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            volumes: BTreeMap::new(),
            deregistered: BTreeSet::new(),
            tokens: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            images_by_tag: HashMap::new(),
            copying: BTreeSet::new(),
            copies_in_flight: HashMap::new(),
        }
    }

    /// Every new image goes through here, so that the indexes know of it.
    fn insert_image(&mut self, image: Image) {
        if let Some(task) = &image.copy {
            self.copying.insert((task.ready_at, image.id.clone()));
            *self
                .copies_in_flight
                .entry((image.region.clone(), image.owner.clone()))
                .or_default() += 1;
        }
        self.index_tags(&image.id, &image.tags);
        self.images.insert(image.id.clone(), image);
    }

    fn remove_image(&mut self, id: &str) -> Option<Image> {
        let image = self.images.remove(id)?;
        if let Some(task) = &image.copy {
            self.copy_done(task.ready_at, &image.id, &image.region, &image.owner);
        }
        self.unindex_tags(id, &image.tags);
        Some(image)
    }

    fn copy_done(&mut self, ready_at: OffsetDateTime, id: &str, region: &str, owner: &str) {
        self.copying.remove(&(ready_at, id.to_string()));
        if let Some(n) = self
            .copies_in_flight
            .get_mut(&(region.to_string(), owner.to_string()))
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Copies running, in every region and account.
    pub fn copies_running(&self) -> usize {
        self.copying.len()
    }

    /// Copies running in `region` for `account`.
    fn copies_in_flight(&self, region: &str, account: &str) -> usize {
        self.copies_in_flight
            .get(&(region.to_string(), account.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Makes every running copy due at `now` (and so complete on the next
    /// tick).
    pub fn finish_copies(&mut self, now: OffsetDateTime) {
        for (_, id) in std::mem::take(&mut self.copying) {
            if let Some(task) = self.images.get_mut(&id).and_then(|i| i.copy.as_mut()) {
                task.ready_at = now;
            }
            self.copying.insert((now, id));
        }
        self.tick(now);
    }

    fn index_tags(&mut self, id: &str, tags: &Tags) {
        for (key, value) in tags {
            self.images_by_tag
                .entry((key.clone(), value.clone()))
                .or_default()
                .insert(id.to_string());
        }
    }

    fn unindex_tags(&mut self, id: &str, tags: &Tags) {
        for (key, value) in tags {
            let entry = (key.clone(), value.clone());
            if let Some(ids) = self.images_by_tag.get_mut(&entry) {
                ids.remove(id);
                if ids.is_empty() {
                    self.images_by_tag.remove(&entry);
                }
            }
        }
    }

    /// The most images `query` can select when it names them: by
    /// `ImageIds`, or by an `image-id` or `tag:` filter without wildcards.
    /// `None` when any image may match.
    fn image_candidates<'a>(&'a self, query: &'a ImageQuery) -> Option<BTreeSet<&'a str>> {
        let mut narrowest = named_ids(&query.image_ids, &query.filters, "image-id");
        if !query.image_ids.is_empty() {
            return narrowest;
        }
        for filter in &query.filters {
            let Some(key) = filter.name.strip_prefix("tag:") else {
                continue;
            };
            if !filter.values.iter().all(|v| is_literal(v)) {
                continue;
            }
            let ids: BTreeSet<&str> = filter
                .values
                .iter()
                .filter_map(|v| self.images_by_tag.get(&(key.to_string(), v.clone())))
                .flatten()
                .map(String::as_str)
                .collect();
            if narrowest.as_ref().is_none_or(|n| ids.len() < n.len()) {
                narrowest = Some(ids);
            }
        }
        narrowest
    }

    fn new_id(&mut self, prefix: &str) -> String {
        let n: u128 = self.rng.random();
        format!("{prefix}-{:017x}", n & ((1u128 << 68) - 1))
    }

    /// Completes the copies whose time has come.
    pub fn tick(&mut self, now: OffsetDateTime) {
        let due: Vec<(OffsetDateTime, String)> = self
            .copying
            .iter()
            .take_while(|(ready_at, _)| *ready_at <= now)
            .cloned()
            .collect();
        for (ready_at, id) in due {
            let image = self
                .images
                .get_mut(&id)
                .expect("a running copy is an image");
            let task = image.copy.take().expect("a running copy has a task");
            let (region, owner) = (image.region.clone(), image.owner.clone());
            self.copy_done(ready_at, &id, &region, &owner);
            let image = self
                .images
                .get_mut(&id)
                .expect("a running copy is an image");
            let snapshot_state = match task.failure {
                None => {
                    image.state = ImageState::Available;
                    SnapshotState::Completed
                }
                Some(reason) => {
                    image.state = ImageState::Failed;
                    image.state_reason = Some(reason);
                    SnapshotState::Error
                }
            };
            let snapshot_ids: Vec<String> = image.snapshot_ids().map(str::to_string).collect();
            for snapshot_id in snapshot_ids {
                if let Some(s) = self.snapshots.get_mut(&snapshot_id) {
                    s.state = snapshot_state;
                }
            }
        }
    }

    /// The image `id` in the caller's region, if the caller may use it.
    fn usable_image(&self, ctx: &Ctx, region: &str, id: &str) -> ApiResult<&Image> {
        check_image_id(id)?;
        self.images
            .get(id)
            .filter(|i| i.region == region && i.usable_by(ctx.account()))
            .ok_or_else(|| not_found_image(&[id]))
    }

    fn owned_image_mut(&mut self, ctx: &Ctx, id: &str) -> ApiResult<&mut Image> {
        self.usable_image(ctx, ctx.region(), id)?;
        let image = self.images.get_mut(id).expect("checked above");
        if image.owner != ctx.account() {
            return Err(ApiError::client(
                "AuthFailure",
                format!("Not authorized for image:{id}"),
            ));
        }
        Ok(image)
    }

    fn usable_snapshot(&self, ctx: &Ctx, id: &str) -> ApiResult<&Snapshot> {
        check_snapshot_id(id)?;
        self.snapshots
            .get(id)
            .filter(|s| s.region == ctx.region() && s.usable_by(ctx.account()))
            .ok_or_else(|| not_found_snapshot(id))
    }

    fn owned_snapshot_mut(&mut self, ctx: &Ctx, id: &str) -> ApiResult<&mut Snapshot> {
        self.usable_snapshot(ctx, id)?;
        let snapshot = self.snapshots.get_mut(id).expect("checked above");
        if snapshot.owner != ctx.account() {
            return Err(ApiError::client(
                "AuthFailure",
                format!("Not authorized for snapshot:{id}"),
            ));
        }
        Ok(snapshot)
    }

    /// The image in `region` of `account` that already carries `name`.
    fn image_named(&self, region: &str, account: &str, name: &str) -> Option<&Image> {
        self.images
            .values()
            .find(|i| i.region == region && i.owner == account && i.name == name)
    }

    fn check_name_free(&self, ctx: &Ctx, name: &str) -> ApiResult<()> {
        check_image_name(name)?;
        match self.image_named(ctx.region(), ctx.account(), name) {
            Some(other) => Err(ApiError::client(
                "InvalidAMIName.Duplicate",
                format!("AMI name {name} is already in use by AMI {}", other.id),
            )),
            None => Ok(()),
        }
    }

    pub fn create_volume(&mut self, ctx: &Ctx, req: CreateVolume) -> ApiResult<&Volume> {
        let zone_ok = req
            .availability_zone
            .strip_prefix(ctx.region())
            .is_some_and(|z| z.len() == 1 && ('a'..='f').any(|c| z.starts_with(c)));
        if !zone_ok {
            return Err(ApiError::client(
                "InvalidZone.NotFound",
                format!(
                    "The zone '{}' does not exist in region {}.",
                    req.availability_zone,
                    ctx.region()
                ),
            ));
        }
        let from_snapshot = match &req.snapshot_id {
            Some(id) => Some(self.usable_snapshot(ctx, id)?.clone()),
            None => None,
        };
        let size = match (req.size, &from_snapshot) {
            (Some(size), _) => size,
            (None, Some(s)) => s.volume_size,
            (None, None) => return Err(ApiError::missing("Size")),
        };
        if !(1..=65536).contains(&size) {
            return Err(ApiError::invalid_value(
                "size",
                &size.to_string(),
                "Volume size must be between 1 and 65536 GiB.",
            ));
        }
        let encrypted = req.encrypted
            || from_snapshot.as_ref().is_some_and(|s| s.encrypted)
            || ctx.config.encrypts_by_default(ctx.account(), ctx.region());
        let kms_key_id = match (&req.kms_key_id, encrypted) {
            (Some(_), false) => {
                return Err(ApiError::client(
                    "InvalidParameterDependency",
                    "The parameter KmsKeyId requires the parameter Encrypted to be set.",
                ));
            }
            (Some(key), true) => Some(resolve_kms_key(key, ctx.account(), ctx.region())?),
            (None, true) => Some(
                from_snapshot
                    .as_ref()
                    .and_then(|s| s.kms_key_id.clone())
                    .unwrap_or_else(|| default_ebs_key(ctx.account(), ctx.region())),
            ),
            (None, false) => None,
        };
        let tags = tags_for(&req.tag_specs, &["volume"], "volume")?;
        let id = self.new_id("vol");
        let volume = Volume {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            availability_zone: req.availability_zone,
            size,
            volume_type: req.volume_type.unwrap_or_else(|| "gp2".to_string()),
            encrypted,
            kms_key_id,
            snapshot_id: req.snapshot_id,
            create_time: ctx.now,
            tags,
        };
        Ok(self.volumes.entry(id).or_insert(volume))
    }

    pub fn create_snapshot(
        &mut self,
        ctx: &Ctx,
        volume_id: &str,
        description: Option<String>,
        tag_specs: &[TagSpec],
    ) -> ApiResult<&Snapshot> {
        let volume = self
            .volumes
            .get(volume_id)
            .filter(|v| v.region == ctx.region() && v.owner == ctx.account())
            .ok_or_else(|| {
                ApiError::client(
                    "InvalidVolume.NotFound",
                    format!("The volume '{volume_id}' does not exist."),
                )
            })?
            .clone();
        check_description(description.as_deref())?;
        let tags = tags_for(tag_specs, &["snapshot"], "snapshot")?;
        let id = self.new_id("snap");
        let snapshot = Snapshot {
            id: id.clone(),
            region: volume.region,
            owner: volume.owner,
            volume_id: volume.id,
            volume_size: volume.size,
            description: description.unwrap_or_default(),
            state: SnapshotState::Completed,
            start_time: ctx.now,
            encrypted: volume.encrypted,
            kms_key_id: volume.kms_key_id,
            tags,
            create_volume_permissions: Vec::new(),
            completion_duration_minutes: None,
        };
        Ok(self.snapshots.entry(id).or_insert(snapshot))
    }

    pub fn register_image(&mut self, ctx: &Ctx, req: RegisterImage) -> ApiResult<String> {
        self.check_name_free(ctx, &req.name)?;
        check_description(req.description.as_deref())?;
        let tags = tags_for(&req.tag_specs, &["image"], "image")?;
        let mut block_devices = Vec::new();
        for device in &req.block_devices {
            if device.no_device {
                continue;
            }
            let ebs = match &device.ebs {
                None => None,
                Some(ebs) => {
                    let snapshot = match &ebs.snapshot_id {
                        Some(id) => Some(self.usable_snapshot(ctx, id)?),
                        None => None,
                    };
                    let volume_size = ebs
                        .volume_size
                        .or(snapshot.map(|s| s.volume_size))
                        .ok_or_else(|| ApiError::missing("BlockDeviceMapping.Ebs.VolumeSize"))?;
                    Some(EbsDevice {
                        snapshot_id: ebs.snapshot_id.clone(),
                        volume_size,
                        delete_on_termination: ebs.delete_on_termination.unwrap_or(true),
                        volume_type: ebs.volume_type.clone().unwrap_or_else(|| "gp2".to_string()),
                        encrypted: snapshot.is_some_and(|s| s.encrypted),
                        kms_key_id: snapshot.and_then(|s| s.kms_key_id.clone()),
                    })
                }
            };
            block_devices.push(BlockDevice {
                device_name: device.device_name.clone(),
                virtual_name: device.virtual_name.clone(),
                ebs,
            });
        }
        let (root_device_type, image_location) = match &req.image_location {
            Some(location) => ("instance-store", location.clone()),
            None => {
                let root = req
                    .root_device_name
                    .as_deref()
                    .ok_or_else(|| ApiError::missing("RootDeviceName"))?;
                let has_root = block_devices.iter().any(|d| {
                    d.device_name == root && d.ebs.as_ref().is_some_and(|e| e.snapshot_id.is_some())
                });
                if !has_root {
                    return Err(ApiError::client(
                        "InvalidBlockDeviceMapping",
                        format!(
                            "The root device {root} needs an EBS snapshot in the block device mapping"
                        ),
                    ));
                }
                ("ebs", format!("{}/{}", ctx.account(), req.name))
            }
        };
        let id = self.new_id("ami");
        let image = Image {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            name: req.name,
            description: req.description,
            state: ImageState::Available,
            state_reason: None,
            creation_date: ctx.now,
            architecture: req.architecture.unwrap_or_else(|| "i386".to_string()),
            virtualization_type: req
                .virtualization_type
                .unwrap_or_else(|| "paravirtual".to_string()),
            root_device_type: root_device_type.to_string(),
            root_device_name: req.root_device_name,
            image_location,
            block_devices,
            tags,
            launch_permissions: Vec::new(),
            billing_products: req.billing_products,
            ena_support: req.ena_support,
            source: None,
            deprecation_time: None,
            copy: None,
        };
        self.insert_image(image);
        Ok(id)
    }

    /// Places an image (and its root snapshot) straight into the state.
    pub fn seed_image(
        &mut self,
        config: &SimConfig,
        seed: SeedImage,
        now: OffsetDateTime,
    ) -> String {
        let owner = seed.owner.unwrap_or_else(|| config.default_account.clone());
        let id = self.new_id("ami");
        let instance_store = seed.root_device_type == "instance-store";
        let (root_device_name, block_devices) = if instance_store {
            (None, Vec::new())
        } else {
            let kms_key_id = seed.encrypted.then(|| {
                seed.kms_key_id
                    .clone()
                    .unwrap_or_else(|| default_ebs_key(&owner, &seed.region))
            });
            let snapshot_id = self.new_id("snap");
            self.snapshots.insert(
                snapshot_id.clone(),
                Snapshot {
                    id: snapshot_id.clone(),
                    region: seed.region.clone(),
                    owner: owner.clone(),
                    volume_id: "vol-ffffffff".to_string(),
                    volume_size: seed.volume_size,
                    description: format!("Created for seeded image {id}"),
                    state: SnapshotState::Completed,
                    start_time: now,
                    encrypted: seed.encrypted,
                    kms_key_id: kms_key_id.clone(),
                    tags: Tags::new(),
                    create_volume_permissions: Vec::new(),
                    completion_duration_minutes: None,
                },
            );
            let root = "/dev/xvda".to_string();
            let device = BlockDevice {
                device_name: root.clone(),
                virtual_name: None,
                ebs: Some(EbsDevice {
                    snapshot_id: Some(snapshot_id),
                    volume_size: seed.volume_size,
                    delete_on_termination: true,
                    volume_type: "gp3".to_string(),
                    encrypted: seed.encrypted,
                    kms_key_id,
                }),
            };
            (Some(root), vec![device])
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
        };
        self.insert_image(image);
        id
    }

    /// Starts a copy into the caller's region. `failure` is asked once, only
    /// when a new copy really starts, whether that copy is doomed.
    pub fn copy_image(
        &mut self,
        ctx: &Ctx,
        req: CopyImage,
        copy_duration: std::time::Duration,
        failure: &mut dyn FnMut() -> Option<StateReason>,
    ) -> ApiResult<String> {
        let token_key = req.client_token.as_ref().map(|token| TokenKey {
            account: ctx.account().to_string(),
            region: ctx.region().to_string(),
            token: token.clone(),
        });
        let fingerprint = CopyImage {
            client_token: None,
            ..req.clone()
        };
        if let Some(key) = &token_key
            && let Some((earlier, image_id)) = self.tokens.get(key)
        {
            return if *earlier == fingerprint {
                Ok(image_id.clone())
            } else {
                Err(ApiError::client(
                    "IdempotentParameterMismatch",
                    format!(
                        "Arguments on this idempotent request are inconsistent with arguments used in previous request(s) with client token {}.",
                        key.token
                    ),
                ))
            };
        }

        if !ctx.config.is_region(&req.source_region) {
            return Err(ApiError::invalid_value(
                "SourceRegion",
                &req.source_region,
                "Unknown region.",
            ));
        }
        let source = self
            .usable_image(ctx, &req.source_region, &req.source_image_id)?
            .clone();
        check_description(req.description.as_deref())?;
        self.check_name_free(ctx, &req.name)?;
        if source.state != ImageState::Available {
            return Err(ApiError::client(
                "IncorrectState",
                format!(
                    "Image {} is in state {}; only available images can be copied.",
                    source.id,
                    source.state.as_str()
                ),
            ));
        }
        if source.owner != ctx.account() && !source.billing_products.is_empty() {
            return Err(ApiError::client(
                "InvalidRequest",
                format!(
                    "Image {} has billing products and was shared by another account; such images cannot be copied.",
                    source.id
                ),
            ));
        }
        if source.virtualization_type == "paravirtual"
            && !ctx.config.supports_paravirtual(ctx.region())
        {
            return Err(ApiError::client(
                "UnsupportedOperation",
                format!(
                    "Paravirtual images are not supported in {}: {} cannot be copied there.",
                    ctx.region(),
                    source.id
                ),
            ));
        }
        if let Some(minutes) = req.snapshot_copy_completion_minutes
            && (!(15..=2880).contains(&minutes) || minutes % 15 != 0)
        {
            return Err(ApiError::invalid_value(
                "SnapshotCopyCompletionDurationMinutes",
                &minutes.to_string(),
                "Must be a multiple of 15 between 15 and 2880.",
            ));
        }
        let wants_encryption = req.encrypted == Some(true);
        if !source.is_ebs() && (wants_encryption || req.kms_key_id.is_some()) {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                format!(
                    "Image {} is instance store-backed; encryption applies only to EBS-backed images.",
                    source.id
                ),
            ));
        }
        let requested_key = match &req.kms_key_id {
            Some(_) if !wants_encryption => {
                return Err(ApiError::client(
                    "InvalidParameterDependency",
                    "The parameter KmsKeyId requires the parameter Encrypted to be set.",
                ));
            }
            Some(key) => Some(resolve_kms_key(key, ctx.account(), ctx.region())?),
            None => None,
        };
        let mut image_tags = Tags::new();
        if req.copy_image_tags {
            image_tags.extend(
                source
                    .tags
                    .iter()
                    .filter(|(k, _)| !k.starts_with("aws:"))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        merge_tags(
            &mut image_tags,
            tags_for(&req.tag_specs, &["image", "snapshot"], "image")?,
        )?;
        let snapshot_tags = tags_for(&req.tag_specs, &["image", "snapshot"], "snapshot")?;
        let in_flight = self.copies_in_flight(ctx.region(), ctx.account());
        if in_flight >= ctx.config.concurrent_copy_limit {
            return Err(ApiError::client(
                "ResourceLimitExceeded",
                format!(
                    "You have reached the limit of {} concurrent AMI copies in {}; wait for some to complete.",
                    ctx.config.concurrent_copy_limit,
                    ctx.region()
                ),
            ));
        }

        let id = self.new_id("ami");
        let encrypt_all =
            wants_encryption || ctx.config.encrypts_by_default(ctx.account(), ctx.region());
        let same_region = source.region == ctx.region();
        let mut block_devices = Vec::new();
        for device in &source.block_devices {
            let ebs = match &device.ebs {
                None => None,
                Some(ebs) => {
                    let encrypted = ebs.encrypted || encrypt_all;
                    let kms_key_id = encrypted.then(|| {
                        requested_key
                            .clone()
                            .or_else(|| ebs.kms_key_id.clone().filter(|_| same_region))
                            .unwrap_or_else(|| default_ebs_key(ctx.account(), ctx.region()))
                    });
                    let snapshot_id = match &ebs.snapshot_id {
                        None => None,
                        Some(source_snapshot) => {
                            let snapshot_id = self.new_id("snap");
                            let description = format!(
                                "Copied for DestinationAmi {id} from SourceAmi {} for SourceSnapshot {source_snapshot}. Task created on {}.",
                                source.id,
                                ctx.now.unix_timestamp()
                            );
                            self.snapshots.insert(
                                snapshot_id.clone(),
                                Snapshot {
                                    id: snapshot_id.clone(),
                                    region: ctx.region().to_string(),
                                    owner: ctx.account().to_string(),
                                    volume_id: "vol-ffffffff".to_string(),
                                    volume_size: ebs.volume_size,
                                    description,
                                    state: SnapshotState::Pending,
                                    start_time: ctx.now,
                                    encrypted,
                                    kms_key_id: kms_key_id.clone(),
                                    tags: snapshot_tags.clone(),
                                    create_volume_permissions: Vec::new(),
                                    completion_duration_minutes: req
                                        .snapshot_copy_completion_minutes,
                                },
                            );
                            Some(snapshot_id)
                        }
                    };
                    Some(EbsDevice {
                        snapshot_id,
                        encrypted,
                        kms_key_id,
                        ..ebs.clone()
                    })
                }
            };
            block_devices.push(BlockDevice {
                ebs,
                ..device.clone()
            });
        }
        let image_location = if source.is_ebs() {
            format!("{}/{}", ctx.account(), req.name)
        } else {
            source.image_location.clone()
        };
        let image = Image {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            name: req.name.clone(),
            description: req.description.clone(),
            state: ImageState::Pending,
            state_reason: None,
            creation_date: ctx.now,
            architecture: source.architecture.clone(),
            virtualization_type: source.virtualization_type.clone(),
            root_device_type: source.root_device_type.clone(),
            root_device_name: source.root_device_name.clone(),
            image_location,
            block_devices,
            tags: image_tags,
            launch_permissions: Vec::new(),
            billing_products: source.billing_products.clone(),
            ena_support: source.ena_support,
            source: Some(ImageSource {
                image_id: source.id.clone(),
                region: source.region.clone(),
            }),
            deprecation_time: None,
            copy: Some(CopyTask {
                ready_at: ctx.now + copy_duration,
                failure: failure(),
            }),
        };
        self.insert_image(image);
        if let Some(key) = token_key {
            self.tokens.insert(key, (fingerprint, id.clone()));
        }
        Ok(id)
    }

    pub fn describe_images(
        &self,
        ctx: &Ctx,
        query: &ImageQuery,
    ) -> ApiResult<(Vec<&Image>, Option<String>)> {
        if !query.image_ids.is_empty() && query.page != Page::default() {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                "The parameter ImageIds cannot be used with the parameter MaxResults or NextToken",
            ));
        }
        check_page(&query.page)?;
        for id in &query.image_ids {
            check_image_id(id)?;
        }
        let region = ctx.region();
        let account = ctx.account();
        let missing: Vec<&str> = query
            .image_ids
            .iter()
            .map(String::as_str)
            .filter(|id| {
                let live = self
                    .images
                    .get(*id)
                    .is_some_and(|i| i.region == region && i.usable_by(account));
                !live && !self.deregistered.contains(*id)
            })
            .collect();
        if !missing.is_empty() {
            return Err(not_found_image(&missing));
        }
        let owners = resolve_owners(&query.owners, account);
        let executable_by = resolve_owners(&query.executable_by, account);
        let candidates = self.image_candidates(query);
        let mut selected = Vec::new();
        for (id, image) in among(&self.images, candidates.as_ref()) {
            if image.region != region || !image.usable_by(account) {
                continue;
            }
            if !query.image_ids.is_empty() && !query.image_ids.contains(id) {
                continue;
            }
            if !owners.is_empty() && !owners.contains(&image.owner) {
                continue;
            }
            if !executable_by.is_empty() {
                let executable = executable_by.iter().any(|who| {
                    (who == "all" && image.is_public())
                        || image
                            .launch_permissions
                            .contains(&Permission::UserId(who.clone()))
                        || (who == account && image.is_public())
                });
                if !executable {
                    continue;
                }
            }
            if query.image_ids.is_empty()
                && !query.include_deprecated
                && image.owner != account
                && image.is_deprecated(ctx.now)
            {
                continue;
            }
            if !matches_filters(image, &query.filters, image_filter_values)? {
                continue;
            }
            selected.push((id, image));
        }
        paginate(selected, &query.page)
    }

    pub fn deregister_image(
        &mut self,
        ctx: &Ctx,
        id: &str,
        delete_snapshots: bool,
    ) -> ApiResult<Vec<SnapshotDeletion>> {
        check_image_id(id)?;
        if self.deregistered.contains(id) {
            return Err(ApiError::client(
                "InvalidAMIID.Unavailable",
                format!("The image id '[{id}]' is no longer available"),
            ));
        }
        self.owned_image_mut(ctx, id)?;
        let image = self.remove_image(id).expect("checked above");
        self.deregistered.insert(id.to_string());
        let mut deletions = Vec::new();
        for snapshot_id in image.snapshot_ids() {
            let still_used = self
                .images
                .values()
                .any(|i| i.snapshot_ids().any(|s| s == snapshot_id));
            let copy_in_flight = image.copy.is_some();
            if copy_in_flight && !still_used {
                // The copy never finished: its half-made snapshots go with it.
                self.snapshots.remove(snapshot_id);
                continue;
            }
            if !delete_snapshots {
                continue;
            }
            let return_code = match self.snapshots.get(snapshot_id) {
                None => "client-error",
                Some(s) if s.owner != ctx.account() => "missing-permissions",
                Some(_) if still_used => "skipped",
                Some(_) => {
                    self.snapshots.remove(snapshot_id);
                    "success"
                }
            };
            deletions.push(SnapshotDeletion {
                snapshot_id: snapshot_id.to_string(),
                return_code,
            });
        }
        Ok(deletions)
    }

    pub fn describe_snapshots(
        &self,
        ctx: &Ctx,
        query: &SnapshotQuery,
    ) -> ApiResult<(Vec<&Snapshot>, Option<String>)> {
        if !query.snapshot_ids.is_empty() && query.page != Page::default() {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                "The parameter SnapshotIds cannot be used with the parameter MaxResults or NextToken",
            ));
        }
        check_page(&query.page)?;
        for id in &query.snapshot_ids {
            self.usable_snapshot(ctx, id)?;
        }
        let owners = resolve_owners(&query.owners, ctx.account());
        let restorable_by = resolve_owners(&query.restorable_by, ctx.account());
        // Snapshots are narrowed by ID only: the operator looks them up by
        // tag just when it cleans up.
        let named = named_ids(&query.snapshot_ids, &query.filters, "snapshot-id");
        let mut selected = Vec::new();
        for (id, snapshot) in among(&self.snapshots, named.as_ref()) {
            if snapshot.region != ctx.region() || !snapshot.usable_by(ctx.account()) {
                continue;
            }
            if !query.snapshot_ids.is_empty() && !query.snapshot_ids.contains(id) {
                continue;
            }
            if !owners.is_empty() && !owners.contains(&snapshot.owner) {
                continue;
            }
            if !restorable_by.is_empty() && !restorable_by.iter().any(|a| snapshot.usable_by(a)) {
                continue;
            }
            if !matches_filters(snapshot, &query.filters, snapshot_filter_values)? {
                continue;
            }
            selected.push((id, snapshot));
        }
        paginate(selected, &query.page)
    }

    pub fn delete_snapshot(&mut self, ctx: &Ctx, id: &str) -> ApiResult<()> {
        self.owned_snapshot_mut(ctx, id)?;
        if let Some(image) = self
            .images
            .values()
            .find(|i| i.snapshot_ids().any(|s| s == id))
        {
            return Err(ApiError::client(
                "InvalidSnapshot.InUse",
                format!("The snapshot {id} is currently in use by {}", image.id),
            ));
        }
        self.snapshots.remove(id);
        Ok(())
    }

    fn tags_mut(&mut self, ctx: &Ctx, resource_id: &str) -> ApiResult<&mut Tags> {
        let prefix = resource_id.split_once('-').map(|(p, _)| p);
        match prefix {
            Some("ami") => Ok(&mut self.owned_image_mut(ctx, resource_id)?.tags),
            Some("snap") => Ok(&mut self.owned_snapshot_mut(ctx, resource_id)?.tags),
            Some("vol") => self
                .volumes
                .get_mut(resource_id)
                .filter(|v| v.region == ctx.region() && v.owner == ctx.account())
                .map(|v| &mut v.tags)
                .ok_or_else(|| {
                    ApiError::client(
                        "InvalidVolume.NotFound",
                        format!("The volume '{resource_id}' does not exist."),
                    )
                }),
            _ => Err(ApiError::client(
                "InvalidID",
                format!("The ID '{resource_id}' is not valid"),
            )),
        }
    }

    pub fn create_tags(
        &mut self,
        ctx: &Ctx,
        resource_ids: &[String],
        tags: &[(String, String)],
    ) -> ApiResult<()> {
        // Validate every resource first: EC2 tags all or nothing.
        for id in resource_ids {
            let mut current = self.tags_mut(ctx, id)?.clone();
            merge_tags(&mut current, tags.iter().cloned())?;
        }
        for id in resource_ids {
            self.retag(ctx, id, |target| merge_tags(target, tags.iter().cloned()))?;
        }
        Ok(())
    }

    /// Removes tags; a `None` value removes the key whatever its value, and
    /// no tags at all removes every user tag.
    pub fn delete_tags(
        &mut self,
        ctx: &Ctx,
        resource_ids: &[String],
        tags: &[(String, Option<String>)],
    ) -> ApiResult<()> {
        for id in resource_ids {
            self.tags_mut(ctx, id)?;
        }
        for id in resource_ids {
            self.retag(ctx, id, |target| {
                if tags.is_empty() {
                    target.retain(|k, _| k.starts_with("aws:"));
                }
                for (key, value) in tags {
                    if value.as_ref().is_none_or(|v| target.get(key) == Some(v)) {
                        target.remove(key);
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Changes one resource's tags, keeping the image tag index in step.
    fn retag(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: impl FnOnce(&mut Tags) -> ApiResult<()>,
    ) -> ApiResult<()> {
        let target = self.tags_mut(ctx, id)?;
        let before = target.clone();
        let outcome = change(target);
        let after = target.clone();
        if self.images.contains_key(id) {
            self.unindex_tags(id, &before);
            self.index_tags(id, &after);
        }
        outcome
    }

    pub fn image(&self, ctx: &Ctx, id: &str) -> ApiResult<&Image> {
        self.usable_image(ctx, ctx.region(), id)
    }

    pub fn modify_launch_permission(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: &PermissionChange,
    ) -> ApiResult<()> {
        for permission in change.add.iter().chain(&change.remove) {
            check_permission(permission)?;
        }
        let image = self.owned_image_mut(ctx, id)?;
        apply_permissions(&mut image.launch_permissions, change);
        Ok(())
    }

    pub fn modify_description(
        &mut self,
        ctx: &Ctx,
        id: &str,
        description: String,
    ) -> ApiResult<()> {
        check_description(Some(&description))?;
        self.owned_image_mut(ctx, id)?.description = Some(description);
        Ok(())
    }

    pub fn modify_create_volume_permission(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: &PermissionChange,
    ) -> ApiResult<()> {
        for permission in change.add.iter().chain(&change.remove) {
            match permission {
                Permission::UserId(_) | Permission::Group(_) => check_permission(permission)?,
                other => {
                    return Err(ApiError::client(
                        "InvalidParameterValue",
                        format!("{other:?} is not a create volume permission"),
                    ));
                }
            }
        }
        let snapshot = self.owned_snapshot_mut(ctx, id)?;
        apply_permissions(&mut snapshot.create_volume_permissions, change);
        Ok(())
    }

    pub fn enable_image_deprecation(
        &mut self,
        ctx: &Ctx,
        id: &str,
        at: OffsetDateTime,
    ) -> ApiResult<()> {
        // EC2 rounds to the nearest minute.
        let seconds = at.unix_timestamp();
        let rounded = (seconds + 30).div_euclid(60) * 60;
        let at = OffsetDateTime::from_unix_timestamp(rounded).expect("in range");
        if at <= ctx.now {
            return Err(ApiError::invalid_value(
                "DeprecateAt",
                &crate::wire::timestamp(at),
                "The deprecation time must be in the future.",
            ));
        }
        if at > ctx.now + time::Duration::days(365 * 10) {
            return Err(ApiError::invalid_value(
                "DeprecateAt",
                &crate::wire::timestamp(at),
                "The deprecation time can be at most 10 years away.",
            ));
        }
        self.owned_image_mut(ctx, id)?.deprecation_time = Some(at);
        Ok(())
    }
}

fn check_permission(permission: &Permission) -> ApiResult<()> {
    match permission {
        Permission::UserId(id) if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit()) => {
            Err(ApiError::client(
                "InvalidAMIAttributeItemValue",
                format!("Invalid attribute item value \"{id}\" for userId item type."),
            ))
        }
        Permission::Group(g) if g != "all" => Err(ApiError::client(
            "InvalidAMIAttributeItemValue",
            format!("Invalid attribute item value \"{g}\" for group item type."),
        )),
        Permission::OrganizationArn(arn) if !arn.starts_with("arn:aws:organizations::") => Err(
            ApiError::invalid_value("OrganizationArn", arn, "Not an organization ARN."),
        ),
        Permission::OrganizationalUnitArn(arn) if !arn.starts_with("arn:aws:organizations::") => {
            Err(ApiError::invalid_value(
                "OrganizationalUnitArn",
                arn,
                "Not an organizational unit ARN.",
            ))
        }
        _ => Ok(()),
    }
}

fn apply_permissions(list: &mut Vec<Permission>, change: &PermissionChange) {
    for p in &change.add {
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
    list.retain(|p| !change.remove.contains(p));
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
