//! What the reliability tests share: the operator as a separate process (so
//! it can be SIGKILLed, restarted and measured, and so that its SDK retry
//! quota is its own), a simulator per test, and an audit of everything the
//! simulator holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::api::UID_TAG;
use ec2_sim::{Image, SeedImage, SimConfig, Simulator, Snapshot};
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::ec2peer;
use crate::testbed::{self, WAIT};

pub const SOURCE_REGION: &str = "us-east-1";

/// How to start the operator binary; `spawn` again to restart it.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub ec2_endpoint: String,
    /// `--resync-interval`; long by default so that a settled object is only
    /// looked at again when something changes.
    pub resync: &'static str,
}

impl Launch {
    /// Against the shared test bed's kube-apiserver.
    pub fn new(namespace: &str, ec2_endpoint: &str) -> Self {
        let kubeconfig = std::env::var("AMICOPY_KUBECONFIG")
            .expect("AMICOPY_KUBECONFIG is not set: run the tests with hack/test.sh");
        Self {
            kubeconfig: kubeconfig.into(),
            namespace: namespace.to_owned(),
            ec2_endpoint: ec2_endpoint.to_owned(),
            resync: "1h",
        }
    }

    /// Where the process's output goes (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        let dir = std::env::temp_dir().join("ami-copy-operator-reliability");
        std::fs::create_dir_all(&dir).expect("create the log directory");
        dir.join(format!("{}.log", self.namespace))
    }

    pub fn spawn(&self) -> OperatorProcess {
        let metrics = free_addr();
        let log = self.log_path();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the operator log");
        let err = out.try_clone().expect("clone the log handle");
        let child = Command::new(env!("CARGO_BIN_EXE_ami-copy-operator"))
            .args(["run", "--namespace", &self.namespace])
            .args(["--ec2-endpoint-url", &self.ec2_endpoint])
            .args(["--sts-endpoint-url", &self.ec2_endpoint])
            .args(["--default-policy", testbed::TRUST_ALL_POLICY])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--poll-interval", "300ms"])
            .args(["--resync-interval", self.resync])
            .args(["--max-retry-delay", "4s"])
            .args(["--listing-grace", "3s"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("AWS_ACCESS_KEY_ID", ec2peer::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", ec2peer::SECRET_ACCESS_KEY)
            .env("AWS_REGION", SOURCE_REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env(
                "RUST_LOG",
                std::env::var("AMICOPY_OPERATOR_LOG")
                    .unwrap_or_else(|_| "info,aws_smithy_runtime=warn,aws_config=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("start the operator binary");
        let pid = child.id().expect("a running child has a pid");
        OperatorProcess {
            child,
            pid,
            metrics,
            log,
        }
    }
}

/// A test's own namespace, simulator and operator launch.
pub struct Bed {
    pub sim: Simulator,
    pub api: Api<AmiCopy>,
    pub launch: Launch,
}

/// A fresh namespace named after `prefix` and a simulator whose copies take
/// `copy`.
pub async fn bed(prefix: &str, seed: u64, copy: Duration) -> Bed {
    let kube = crate::testbed::kube().await;
    let ns = crate::testbed::namespace(&kube, prefix).await;
    let sim = simulator(seed, copy).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    Bed {
        api: Api::namespaced(kube, &ns),
        sim,
        launch,
    }
}

/// A free loopback port for `--metrics-addr` (released just before use).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// The operator binary, running.
pub struct OperatorProcess {
    child: Child,
    pub pid: u32,
    metrics: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    /// SIGKILL: no shutdown hook runs, nothing is flushed.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the operator");
    }

    /// Panics (with the log's tail) if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the operator exited ({status}); its log ends with:\n{}",
                log_tail(&self.log)
            );
        }
    }

    /// Resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// The operator's /metrics, once it answers.
    pub async fn metrics(&mut self) -> Metrics {
        let deadline = Instant::now() + WAIT;
        loop {
            self.assert_alive();
            if let Some((200, body)) = http_get(self.metrics, "/metrics").await {
                return Metrics(body);
            }
            assert!(Instant::now() < deadline, "/metrics did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The operator's Prometheus text.
pub struct Metrics(String);

impl Metrics {
    /// Sum of every series of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The whole text, as Prometheus scrapes it.
    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn reconciles(&self) -> u64 {
        self.sum("amicopy_reconciles_total") as u64
    }

    /// EC2 operations as the operator counts them (SDK retries inside one).
    pub fn ec2_calls(&self) -> u64 {
        self.sum("amicopy_ec2_calls_total") as u64
    }
}

/// A simulator with the test credentials, a fixed seed and short copies.
pub async fn simulator(seed: u64, copy: Duration) -> Simulator {
    let config = SimConfig {
        seed: Some(seed),
        copy_duration: copy,
        ..ec2peer::sim_config()
    };
    Simulator::start(config)
        .await
        .expect("start the EC2 simulator")
}

/// Seeds an EBS-backed source image in the source region.
pub fn seed_source(sim: &Simulator, name: &str) -> String {
    sim.seed_image(SeedImage::new(SOURCE_REGION, name))
}

/// Every request the simulator answered or refused, whatever the outcome.
pub fn total_calls(sim: &Simulator) -> u64 {
    sim.calls().iter().map(|c| c.count).sum()
}

/// Requests the simulator failed on purpose, by outcome (`applied:…` for a
/// reply lost after the action).
pub fn injected(sim: &Simulator) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in sim.calls() {
        let failure = c.outcome.strip_prefix("applied:").unwrap_or(&c.outcome);
        if matches!(
            failure,
            "RequestLimitExceeded" | "InternalError" | "Unavailable" | "dropped"
        ) {
            *out.entry(c.outcome).or_default() += c.count;
        }
    }
    out
}

/// Images made by CopyImage (seeded sources are not copies).
pub fn copies(sim: &Simulator) -> Vec<Image> {
    sim.images()
        .into_iter()
        .filter(|i| i.source.is_some())
        .collect()
}

/// Snapshots made by CopyImage.
pub fn copy_snapshots(sim: &Simulator) -> Vec<Snapshot> {
    sim.snapshots()
        .into_iter()
        .filter(|s| s.description.starts_with("Copied for DestinationAmi"))
        .collect()
}

/// The copies carrying `uid`, per region.
pub fn owned_by(sim: &Simulator, uid: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for image in copies(sim) {
        if image.tags.get(UID_TAG).map(String::as_str) == Some(uid) {
            out.entry(image.region.clone()).or_default().push(image.id);
        }
    }
    out
}

/// Exactly one copy carrying `uid` in each of `regions`, none elsewhere.
pub fn assert_one_copy_per_region(sim: &Simulator, uid: &str, regions: &[&str]) {
    let owned = owned_by(sim, uid);
    let got: BTreeSet<&str> = owned.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = regions.iter().copied().collect();
    assert_eq!(got, want, "regions holding copies of {uid}: {owned:?}");
    for (region, ids) in &owned {
        assert_eq!(
            ids.len(),
            1,
            "{uid} has {} copies in {region}: {ids:?}",
            ids.len()
        );
    }
}

/// Problems with what the simulator holds, given the copies that live
/// objects name: a copy nobody names, a copy or copy snapshot without an
/// owner's UID tag, a copy snapshot that belongs to no live copy.
pub fn leaks(sim: &Simulator, live: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let images = copies(sim);
    let mut live_snapshots = BTreeSet::new();
    for image in &images {
        if !image.tags.contains_key(UID_TAG) {
            problems.push(format!(
                "copy {} in {} has no owner tag",
                image.id, image.region
            ));
        }
        if live.contains(&image.id) {
            live_snapshots.extend(image.snapshot_ids().map(str::to_owned));
        } else {
            problems.push(format!(
                "copy {} in {} ({:?}) is named by no live object",
                image.id,
                image.region,
                image.tags.get(UID_TAG)
            ));
        }
    }
    for snap in copy_snapshots(sim) {
        if !snap.tags.contains_key(UID_TAG) {
            problems.push(format!(
                "snapshot {} in {} has no owner tag",
                snap.id, snap.region
            ));
        }
        if !live_snapshots.contains(&snap.id) {
            problems.push(format!(
                "snapshot {} in {} ({:?}, {:?}) belongs to no live copy",
                snap.id,
                snap.region,
                snap.tags.get(UID_TAG),
                snap.description
            ));
        }
    }
    problems
}

/// Image IDs the objects' status lists, current and retiring.
pub fn listed(objects: &[AmiCopy]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(|o| o.status.as_ref())
        .flat_map(|s| s.destinations.iter().chain(&s.retiring))
        .filter_map(|d| d.image_id.clone())
        .collect()
}

pub fn manifest(name: &str, spec: serde_json::Value) -> AmiCopy {
    serde_json::from_value(json!({
        "apiVersion": "amicopy.dev/v1alpha1",
        "kind": "AmiCopy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid AmiCopy")
}

/// A spec copying `source` into `regions`.
pub fn spec(source: &str, regions: &[&str]) -> serde_json::Value {
    let destinations: Vec<_> = regions.iter().map(|r| json!({"region": r})).collect();
    json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": destinations})
}

pub async fn create(api: &Api<AmiCopy>, name: &str, spec: serde_json::Value) -> AmiCopy {
    api.create(&PostParams::default(), &manifest(name, spec))
        .await
        .expect("create the AmiCopy")
}

/// Polls `check` until it holds; panics after [`WAIT`].
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The condition's (status, reason, message).
pub fn condition_of(obj: &AmiCopy, type_: &str) -> Option<(String, String, String)> {
    obj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_degraded(obj: &AmiCopy) -> bool {
    condition_of(obj, "Degraded").is_some_and(|(s, _, _)| s == "True")
}
