//! EC2 API peers for integration tests: moto (shared, started by the test
//! bed) and the in-process simulator, both driven through aws-sdk-ec2.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Image, ResourceType, Tag, TagSpecification,
};
use ec2_sim::{Identity, SimConfig, Simulator};

/// Where the test bed publishes the moto endpoint, e.g. `http://127.0.0.1:5055`.
pub const MOTO_ENDPOINT_ENV: &str = "AMICOPY_MOTO_ENDPOINT";
/// The account moto uses, and the simulator's default one.
pub const ACCOUNT: &str = "123456789012";
pub const ACCESS_KEY_ID: &str = "AKIDAMICOPYTESTBED01";
pub const SECRET_ACCESS_KEY: &str = "amicopy-testbed-secret";

/// Which EC2 implementation a test talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Moto,
    Sim,
}

/// Client options beyond endpoint and region.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Attempts per call, retries included; 1 turns retries off.
    pub max_attempts: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            access_key_id: ACCESS_KEY_ID.to_string(),
            secret_access_key: SECRET_ACCESS_KEY.to_string(),
            max_attempts: 3,
        }
    }
}

/// An EC2 client for `endpoint` and `region` with static test credentials;
/// nothing is read from the environment.
pub fn client(endpoint: &str, region: &str) -> Client {
    client_with(endpoint, region, &ClientOptions::default())
}

pub fn client_with(endpoint: &str, region: &str, options: &ClientOptions) -> Client {
    let retry = RetryConfig::standard()
        .with_max_attempts(options.max_attempts)
        .with_initial_backoff(Duration::from_millis(10))
        .with_max_backoff(Duration::from_millis(100));
    let config = aws_sdk_ec2::config::Builder::new()
        .behavior_version_latest()
        .endpoint_url(endpoint)
        .region(Region::new(region.to_string()))
        .credentials_provider(Credentials::new(
            &options.access_key_id,
            &options.secret_access_key,
            None,
            None,
            "amicopy-tests",
        ))
        .retry_config(retry)
        .build();
    Client::from_conf(config)
}

/// The moto endpoint; panics with directions when the test bed is not up,
/// so that moto-backed tests fail loudly instead of being skipped.
pub fn moto_endpoint() -> String {
    match std::env::var(MOTO_ENDPOINT_ENV) {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => panic!(
            "{MOTO_ENDPOINT_ENV} is not set: these tests need moto. Run them with \
             hack/test.sh, which starts the test bed, or start moto_server yourself \
             and export {MOTO_ENDPOINT_ENV}=http://127.0.0.1:PORT"
        ),
    }
}

/// The simulator configuration the tests use: the test credentials are
/// known, so every SDK signature is verified; copies take a moment.
pub fn sim_config() -> SimConfig {
    let mut config = SimConfig {
        copy_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    config.identities.insert(
        ACCESS_KEY_ID.to_string(),
        Identity {
            account: ACCOUNT.to_string(),
            secret_access_key: Some(SECRET_ACCESS_KEY.to_string()),
        },
    );
    config
}

/// A connected peer: moto (shared) or a simulator of the test's own.
pub struct PeerEnv {
    endpoint: String,
    sim: Option<Simulator>,
}

impl PeerEnv {
    pub async fn start(peer: Peer) -> Self {
        match peer {
            Peer::Moto => Self {
                endpoint: moto_endpoint(),
                sim: None,
            },
            Peer::Sim => Self::with_sim(sim_config()).await,
        }
    }

    pub async fn with_sim(config: SimConfig) -> Self {
        let sim = Simulator::start(config)
            .await
            .expect("start the EC2 simulator");
        Self {
            endpoint: sim.endpoint(),
            sim: Some(sim),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn client(&self, region: &str) -> Client {
        client(&self.endpoint, region)
    }

    pub fn client_with(&self, region: &str, options: &ClientOptions) -> Client {
        client_with(&self.endpoint, region, options)
    }

    /// The simulator's control API; only for simulator-backed tests.
    pub fn sim(&self) -> &Simulator {
        self.sim
            .as_ref()
            .expect("this test needs the simulator, not moto")
    }
}

/// A name no other test (or earlier run against the same moto) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// The error code of a failed call, if EC2 sent one.
pub fn error_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<String> {
    err.as_service_error()
        .and_then(|e| e.code())
        .map(str::to_string)
}

/// What [`seed_image`] created.
#[derive(Clone, Debug)]
pub struct Seeded {
    pub image_id: String,
    pub snapshot_id: String,
    pub volume_id: String,
}

/// Registers an EBS-backed image the way a person would: CreateVolume,
/// CreateSnapshot, RegisterImage. Works against both peers.
pub async fn seed_image(
    client: &Client,
    region: &str,
    name: &str,
    tags: &[(&str, &str)],
) -> Seeded {
    let volume = client
        .create_volume()
        .availability_zone(format!("{region}a"))
        .size(8)
        .send()
        .await
        .expect("CreateVolume");
    let volume_id = volume.volume_id().expect("volume id").to_string();
    let snapshot = client
        .create_snapshot()
        .volume_id(&volume_id)
        .description(format!("root of {name}"))
        .send()
        .await
        .expect("CreateSnapshot");
    let snapshot_id = snapshot.snapshot_id().expect("snapshot id").to_string();
    let mut register = client
        .register_image()
        .name(name)
        .description(format!("seeded {name}"))
        .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
        .virtualization_type("hvm")
        .root_device_name("/dev/xvda")
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name("/dev/xvda")
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(&snapshot_id)
                        .volume_type(aws_sdk_ec2::types::VolumeType::Gp3)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    if !tags.is_empty() {
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Image);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        register = register.tag_specifications(spec.build());
    }
    let image_id = register
        .send()
        .await
        .expect("RegisterImage")
        .image_id()
        .expect("image id")
        .to_string();
    // Moto ignores tags given at registration; CreateTags works on both.
    if !tags.is_empty() {
        let mut create = client.create_tags().resources(&image_id);
        for (k, v) in tags {
            create = create.tags(Tag::builder().key(*k).value(*v).build());
        }
        create.send().await.expect("CreateTags");
    }
    Seeded {
        image_id,
        snapshot_id,
        volume_id,
    }
}

/// The image, or `None` when DescribeImages by id returns nothing.
pub async fn describe_image(client: &Client, image_id: &str) -> Option<Image> {
    let out = client
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .expect("DescribeImages");
    out.images().first().cloned()
}

/// Polls until the image reaches `state`; panics after `timeout`.
pub async fn wait_for_state(
    client: &Client,
    image_id: &str,
    state: &str,
    timeout: Duration,
) -> Image {
    let deadline = Instant::now() + timeout;
    loop {
        let image = describe_image(client, image_id).await;
        if let Some(image) = &image
            && image.state().map(|s| s.as_str()) == Some(state)
        {
            return image.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{image_id} did not become {state} within {timeout:?}: {image:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
