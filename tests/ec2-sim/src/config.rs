//! Static configuration of a simulator instance.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The account that every access key without an explicit mapping belongs to.
pub const DEFAULT_ACCOUNT: &str = "123456789012";

/// Regions the simulator accepts by default: the commercial regions that are
/// enabled for every account, plus a few opt-in ones.
pub const DEFAULT_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "ap-south-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-east-1",
    "me-south-1",
    "af-south-1",
];

/// Identity behind one access key id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub account: String,
    /// When set, request signatures made with this key are verified.
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

/// An (account, region) pair, used for per-region account settings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountRegion {
    pub account: String,
    pub region: String,
}

impl AccountRegion {
    pub fn new(account: impl Into<String>, region: impl Into<String>) -> Self {
        Self {
            account: account.into(),
            region: region.into(),
        }
    }
}

/// Everything about a simulator instance that is not image/snapshot state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// Regions that requests may be signed for.
    pub regions: Vec<String>,
    /// Access key id to identity; unmapped keys belong to `default_account`.
    pub identities: BTreeMap<String, Identity>,
    pub default_account: String,
    /// How long a copy stays `pending` before it completes.
    #[serde(with = "millis")]
    pub copy_duration: Duration,
    /// In-flight copies allowed per account and destination region.
    pub concurrent_copy_limit: usize,
    /// Regions where paravirtual images cannot be copied to.
    pub regions_without_paravirtual: Vec<String>,
    /// Accounts and regions with "EBS encryption by default" switched on.
    pub encryption_by_default: Vec<AccountRegion>,
    /// Seed for ids and random fault triggers; `None` draws one at start.
    pub seed: Option<u64>,
    /// IAM roles STS AssumeRole may hand out credentials for (by ARN; the
    /// account is the ARN's), with the external ID each requires, if any.
    #[serde(default)]
    pub roles: BTreeMap<String, Option<String>>,
    /// EC2's eventual consistency: for this long after a call creates an
    /// image or snapshot, every other call answers as if its ID did not
    /// exist; after a call changes tags, tag filters still see the old ones.
    /// Zero (the default) makes every change visible at once.
    #[serde(with = "millis")]
    pub propagation_lag: Duration,
    /// How long DescribeImages, asked by image ID, still returns an image
    /// after it was deregistered, in state `deregistered`. Zero (the
    /// default) answers with an empty result at once.
    #[serde(with = "millis")]
    pub deregistered_visibility: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            regions: DEFAULT_REGIONS.iter().map(|r| r.to_string()).collect(),
            identities: BTreeMap::new(),
            default_account: DEFAULT_ACCOUNT.to_string(),
            copy_duration: Duration::from_secs(2),
            concurrent_copy_limit: 50,
            regions_without_paravirtual: Vec::new(),
            encryption_by_default: Vec::new(),
            seed: None,
            roles: BTreeMap::new(),
            propagation_lag: Duration::ZERO,
            deregistered_visibility: Duration::ZERO,
        }
    }
}

impl SimConfig {
    pub fn is_region(&self, region: &str) -> bool {
        self.regions.iter().any(|r| r == region)
    }

    pub fn identity(&self, access_key_id: &str) -> Identity {
        self.identities
            .get(access_key_id)
            .cloned()
            .unwrap_or_else(|| Identity {
                account: self.default_account.clone(),
                secret_access_key: None,
            })
    }

    pub fn encrypts_by_default(&self, account: &str, region: &str) -> bool {
        self.encryption_by_default
            .iter()
            .any(|ar| ar.account == account && ar.region == region)
    }

    pub fn supports_paravirtual(&self, region: &str) -> bool {
        !self.regions_without_paravirtual.iter().any(|r| r == region)
    }
}

/// Durations travel as integer milliseconds in JSON.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
