//! A test-only simulator of the EC2 image API.
//!
//! It speaks the EC2 Query protocol (form-encoded requests signed with
//! SigV4, XML responses) well enough for `aws-sdk-ec2` to drive it, and
//! models the parts of EC2 an AMI copier depends on: images, snapshots,
//! copies that take time and may fail, ClientToken idempotency, encryption,
//! sharing, tags, quotas, throttling, eventual consistency and faults; and
//! what tells whether an image is still in use before it goes away:
//! deregistration protection, disabled images, launch templates and
//! instances.
//!
//! Actions (anything else is `InvalidAction`):
//!
//! - images: RegisterImage, CopyImage, DescribeImages (`IncludeDeprecated`,
//!   `IncludeDisabled`; reports `deregistrationProtection` and
//!   `lastLaunchedTime`), DeregisterImage, ModifyImageAttribute,
//!   DescribeImageAttribute, EnableImageDeprecation, DisableImage,
//!   EnableImage, EnableImageDeregistrationProtection,
//!   DisableImageDeregistrationProtection;
//! - snapshots and volumes: CreateVolume, CreateSnapshot, DescribeSnapshots,
//!   DeleteSnapshot, ModifySnapshotAttribute;
//! - tags: CreateTags, DeleteTags;
//! - launch templates: CreateLaunchTemplate, CreateLaunchTemplateVersion,
//!   ModifyLaunchTemplate, DeleteLaunchTemplate,
//!   DescribeLaunchTemplateVersions (one template, or `$Latest`/`$Default`
//!   of all; `image-id` and `is-default-version` filters); only
//!   `LaunchTemplateData.ImageId` is modelled;
//! - instances: RunInstances, StartInstances, StopInstances,
//!   TerminateInstances, DescribeInstances; state changes are immediate
//!   and terminated instances stay described;
//! - STS: GetCallerIdentity, AssumeRole.
//!
//! Every action is signed, counted ([`Control::calls`]) and open to fault
//! rules alike. Each resource's rules are documented on its module under
//! [`model`].
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use ec2_sim::{SeedImage, SimConfig, Simulator};
//!
//! let sim = Simulator::start(SimConfig::default()).await?;
//! let image_id = sim.seed_image(SeedImage::new("us-east-1", "base-image"));
//! // Point aws-sdk-ec2 at `sim.endpoint()` and copy `image_id`...
//! sim.finish_copies();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod actions;
mod config;
mod control;
mod faults;
pub mod model;
mod server;
mod sigv4;
pub mod wire;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{AccountRegion, DEFAULT_ACCOUNT, DEFAULT_REGIONS, Identity, SimConfig};
pub use control::{CallCount, Control};
pub use faults::{FaultKind, FaultRule, Phase, Trigger};
pub use model::{
    DeregistrationProtection, Image, ImageState, Instance, InstanceState, LaunchTemplate,
    LaunchTemplateVersion, Permission, SeedImage, Snapshot, SnapshotState, StateReason,
};

/// A running simulator. Dereferences to its [`Control`]; stops when dropped.
pub struct Simulator {
    addr: SocketAddr,
    control: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Simulator {
    /// Serves on a free loopback port.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config)
    }

    /// Serves on a listener the caller bound.
    pub fn start_on(listener: TcpListener, config: SimConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let control = Arc::new(Control::new(config));
        let (stop, stopped) = oneshot::channel::<()>();
        let app = server::router(control.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            control,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give an EC2 client, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Stops accepting requests and waits for the server to wind down.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Runs until the server fails; for the standalone binary.
    pub async fn wait(mut self) -> std::io::Result<()> {
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Deref for Simulator {
    type Target = Control;

    fn deref(&self) -> &Control {
        &self.control
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
