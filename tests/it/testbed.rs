//! The Kubernetes side of the test bed: a client for the real kube-apiserver
//! started by `hack/testbed/up.sh`, the CRD from `crds/`, a namespace per
//! test, and the operator running in-process against an EC2 peer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::controller::{self, Config, Context};
use ami_copy_operator::ec2::AwsEc2;
use ami_copy_operator::metrics::Metrics;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::{Credentials, SharedCredentialsProvider};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use tokio::sync::{OnceCell, oneshot};
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

static CRD: OnceCell<()> = OnceCell::const_new();

/// A client for the test bed's kube-apiserver, with the CRD installed.
pub async fn kube() -> Client {
    let client = Client::try_from(admin_config().await).expect("build a kube client");
    CRD.get_or_init(|| install_crd(client.clone())).await;
    client
}

/// The test bed's admin kubeconfig (`system:masters`) as a client config.
pub async fn admin_config() -> kube::Config {
    let path = std::env::var("AMICOPY_KUBECONFIG").unwrap_or_else(|_| {
        panic!("AMICOPY_KUBECONFIG is not set: run the tests with hack/test.sh, which starts the test bed")
    });
    let kc = Kubeconfig::read_from(&path).expect("read the test bed's kubeconfig");
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is valid")
}

/// Applies `crds/` exactly as a user would and waits until it is served.
async fn install_crd(client: Client) {
    let crds = [
        include_str!("../../crds/amicopy.dev_amicopies.yaml"),
        include_str!("../../crds/amicopy.dev_amicopypolicies.yaml"),
    ]
    .map(|yaml| serde_yaml::from_str(yaml).expect("crds/ parses"));
    apply_crds(&client, crds, "amicopy-tests").await;
}

/// Applies CRDs by server-side apply as `manager` and waits until each is
/// established.
pub async fn apply_crds(
    client: &Client,
    crds: impl IntoIterator<Item = CustomResourceDefinition>,
    manager: &str,
) {
    for crd in crds {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply the CRD");
        tokio::time::timeout(
            WAIT,
            await_condition(api, &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .expect("watch the CRD");
    }
}

/// A fresh namespace for one test.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.generate_name = Some(format!("{prefix}-"));
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create a namespace")
        .name_any()
}

/// Static dummy credentials and a region, as the operator would get from the
/// environment (with the same defaults: time source, sleep, retries); the
/// endpoint is the EC2 peer on loopback.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            crate::ec2peer::ACCESS_KEY_ID,
            crate::ec2peer::SECRET_ACCESS_KEY,
            None,
            None,
            "testbed",
        )))
        .load()
        .await
}

/// The operator, running in this process, watching one namespace.
pub struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The default policy of the test operators, but for the policy tests: it
/// allows everything, so that every other test is about what it tests.
pub const TRUST_ALL_POLICY: &str = r#"{"sourceOwners": ["*"], "regions": ["*"], "roles": [{"arn": "*"}], "kmsKeys": ["*"], "sharing": {"accounts": ["*"], "organizations": ["*"], "organizationalUnits": ["*"], "snapshots": true, "public": true}}"#;

impl Operator {
    pub async fn start(client: &Client, namespace: &str, ec2_endpoint: &str) -> Self {
        Self::start_with(client, namespace, ec2_endpoint, |_| {}).await
    }

    /// Like [`Operator::start`], with test timing that `adjust` may change.
    pub async fn start_with(
        client: &Client,
        namespace: &str,
        ec2_endpoint: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        // The EC2 simulator answers STS AssumeRole too (cross-account tests).
        let ec2 = AwsEc2::new(
            sdk_config().await,
            Some(ec2_endpoint.to_owned()),
            metrics.clone(),
        )
        .with_sts_endpoint(Some(ec2_endpoint.to_owned()))
        // Published parameters go to moto's SSM, whichever the EC2 peer.
        .with_ssm_endpoint(Some(crate::ec2peer::moto_endpoint()));
        let mut config = Config {
            default_policy: serde_json::from_str(TRUST_ALL_POLICY).expect("a policy"),
            poll_interval: Duration::from_millis(300),
            resync_interval: Duration::from_secs(3),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(3),
            ..Config::default()
        };
        adjust(&mut config);
        let ctx = Arc::new(Context::new(client.clone(), ec2, metrics.clone(), config));
        let (tx, rx) = oneshot::channel();
        let ns = namespace.to_owned();
        let task = tokio::spawn(async move {
            controller::run(ctx, Some(ns), async {
                let _ = rx.await;
            })
            .await;
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the controller and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Waits until `check` holds for the object (polling a fresh read, so a
/// failure message can show the last state seen).
pub async fn wait_for(
    api: &Api<AmiCopy>,
    name: &str,
    what: &str,
    check: impl Fn(&AmiCopy) -> bool,
) -> AmiCopy {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let obj = api.get(name).await.expect("read the AmiCopy");
        if check(&obj) {
            return obj;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last status: {:#?}",
                obj.status
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the object is gone.
pub async fn wait_gone(api: &Api<AmiCopy>, name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.get_opt(name).await.expect("read the AmiCopy").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} was not deleted in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn delete(api: &Api<AmiCopy>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete the AmiCopy");
}

/// The status of condition `type_`, with its reason.
pub fn condition(obj: &AmiCopy, type_: &str) -> Option<(String, String)> {
    obj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Ready=True for the current generation.
pub fn is_ready(obj: &AmiCopy) -> bool {
    let current =
        obj.status.as_ref().and_then(|s| s.observed_generation) == obj.metadata.generation;
    current && condition(obj, "Ready").is_some_and(|(s, _)| s == "True")
}

/// A program of the test bed that `hack/testbed/build.sh <component>` builds
/// into the cache: `$env` if set, else `testbed/<dir>-<version>/<program>`
/// under the cache, its version read from `hack/testbed/versions.sh`.
pub fn testbed_program(env: &str, version_key: &str, dir: &str, component: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return path.into();
    }
    let prefix = format!("{version_key}=");
    let version = include_str!("../../hack/testbed/versions.sh")
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{version_key} in hack/testbed/versions.sh"));
    let cache = std::env::var_os("AMICOPY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/ami-copy-operator")
        });
    let path = cache.join(format!("testbed/{dir}-{version}/{component}"));
    assert!(
        path.is_file(),
        "{component} not found at {}: run the tests with hack/test.sh, or `hack/testbed/build.sh {component}`, or set {env}",
        path.display()
    );
    path
}
