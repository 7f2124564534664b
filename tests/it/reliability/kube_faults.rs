//! Property 3: faults from Kubernetes, on a private control plane (its own
//! etcd and kube-apiserver from `hack/testbed/up.sh --no-moto`), so that it
//! can be restarted and given a laxer CRD without disturbing other tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::harness::{self, Launch, assert_one_copy_per_region, leaks};
use crate::testbed::{is_ready, wait_for, wait_gone};

const A: &str = "eu-west-1";
const B: &str = "ap-southeast-2";
const NS: &str = "reliability";

/// etcd and kube-apiserver of this test alone; stopped when dropped.
struct ControlPlane {
    dir: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hack/testbed")
        .join(name)
}

async fn run_script(name: &str, args: &[&str]) {
    let out = tokio::process::Command::new(script(name))
        .args(args)
        .output()
        .await
        .expect("run a test bed script");
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl ControlPlane {
    async fn start(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::ec2peer::unique(prefix));
        run_script("up.sh", &["--no-moto", dir.to_str().unwrap()]).await;
        Self { dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(self.kubeconfig()).expect("read the kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("a valid kubeconfig");
        Client::try_from(config).expect("a kube client")
    }

    /// Stops etcd and kube-apiserver, waits `down`, starts them again with
    /// the same ports, certificates and data.
    async fn restart(&self, down: Duration) {
        let secs = down.as_secs().to_string();
        run_script("restart.sh", &[self.dir.to_str().unwrap(), &secs]).await;
    }

    /// A namespace and the operator binary watching it, against `sim`.
    async fn prepare(&self, crd: CustomResourceDefinition, endpoint: &str) -> (Client, Launch) {
        let client = self.client().await;
        let policies: CustomResourceDefinition = serde_yaml::from_str(include_str!(
            "../../../crds/amicopy.dev_amicopypolicies.yaml"
        ))
        .expect("crds/ parses");
        crate::testbed::apply_crds(&client, [crd, policies], "reliability").await;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the namespace");
        let launch = Launch {
            kubeconfig: self.kubeconfig(),
            ..Launch::new(NS, endpoint)
        };
        (client, launch)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script("down.sh"))
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn crd() -> CustomResourceDefinition {
    serde_yaml::from_str(include_str!("../../../crds/amicopy.dev_amicopies.yaml"))
        .expect("crds/ parses")
}

#[tokio::test]
async fn operator_rides_out_a_control_plane_restart() {
    let cp = ControlPlane::start("restart").await;
    let sim = harness::simulator(30, Duration::from_millis(1500)).await;
    let (client, launch) = cp.prepare(crd(), &sim.endpoint()).await;
    let api: Api<AmiCopy> = Api::namespaced(client.clone(), NS);
    let mut op = launch.spawn();

    let first = harness::seed_source(&sim, "restart-1");
    let before = harness::create(&api, "before", harness::spec(&first, &[A, B])).await;
    wait_for(&api, "before", "Ready=True", is_ready).await;

    // A copy in flight while etcd and kube-apiserver are away: the status
    // writes of the polls in between fail.
    let second = harness::seed_source(&sim, "restart-2");
    let during = harness::create(&api, "during", harness::spec(&second, &[A, B])).await;
    harness::until("the copies started", || async {
        sim.call_count("CopyImage", A) + sim.call_count("CopyImage", B) >= 4
    })
    .await;
    cp.restart(Duration::from_secs(2)).await;
    op.assert_alive();

    wait_for(&api, "during", "Ready=True after the restart", is_ready).await;
    let third = harness::seed_source(&sim, "restart-3");
    let after = harness::create(&api, "after", harness::spec(&third, &[A, B])).await;
    wait_for(
        &api,
        "after",
        "an object created after the restart Ready",
        is_ready,
    )
    .await;
    // The watch sees changes to objects it knew before the restart.
    api.patch(
        "before",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"destinations": [{"region": A}]}})),
    )
    .await
    .unwrap();
    wait_for(&api, "before", "the removed destination retired", |o| {
        is_ready(o)
            && o.status
                .as_ref()
                .is_some_and(|s| s.destinations.len() == 1 && s.retiring.is_empty())
    })
    .await;
    assert_one_copy_per_region(&sim, &before.uid().unwrap(), &[A]);
    for obj in [&during, &after] {
        assert_one_copy_per_region(&sim, &obj.uid().unwrap(), &[A, B]);
    }
    for name in ["before", "during", "after"] {
        crate::testbed::delete(&api, name).await;
    }
    for name in ["before", "during", "after"] {
        wait_gone(&api, name).await;
    }
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}

/// The CRD without a schema for spec and status: anything is stored, as
/// with a CRD edited by hand or an older version without validation.
fn lax_crd() -> CustomResourceDefinition {
    let mut crd = serde_json::to_value(crd()).unwrap();
    let props = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let anything = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    props["spec"] = anything.clone();
    props["status"] = anything;
    serde_json::from_value(crd).unwrap()
}

#[tokio::test]
async fn malformed_objects_are_reported_and_the_others_served() {
    let cp = ControlPlane::start("malformed").await;
    let sim = harness::simulator(31, Duration::from_millis(300)).await;
    let (client, launch) = cp.prepare(lax_crd(), &sim.endpoint()).await;
    let api: Api<AmiCopy> = Api::namespaced(client.clone(), NS);
    let dynamic: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &ApiResource::erase::<AmiCopy>(&()));
    let raw = |name: &str, spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    };
    let source = harness::seed_source(&sim, "malformed");
    let bad = [
        (
            "wrong-type",
            json!({"source": {"region": "us-east-1", "imageId": source}, "destinations": "eu-west-1"}),
        ),
        ("no-source", json!({"destinations": [{"region": A}]})),
        ("bad-status", harness::spec(&source, &[A])),
    ];
    for (name, spec) in &bad {
        dynamic
            .create(&PostParams::default(), &raw(name, spec.clone()))
            .await
            .expect("the lax CRD stores anything");
    }
    dynamic
        .patch_status(
            "bad-status",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"destinations": [{"region": A, "state": "pending", "attempt": -3}]}})),
        )
        .await
        .expect("patch a status the operator cannot read");
    harness::create(&api, "good-1", harness::spec(&source, &[A, B])).await;

    let mut op = launch.spawn();
    wait_for(
        &api,
        "good-1",
        "Ready=True beside malformed objects",
        is_ready,
    )
    .await;
    // Served after the malformed ones are known, and one turned malformed.
    dynamic
        .patch(
            "good-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"destinations": 42}})),
        )
        .await
        .unwrap();
    let other = harness::seed_source(&sim, "malformed-2");
    harness::create(&api, "good-2", harness::spec(&other, &[B])).await;
    wait_for(&api, "good-2", "Ready=True", is_ready).await;
    op.assert_alive();

    for name in ["wrong-type", "no-source", "bad-status", "good-1"] {
        harness::until(&format!("{name} reported as invalid"), || async {
            reported_invalid(&dynamic, name).await
        })
        .await;
    }
    op.assert_alive();
    op.kill().await;
}

/// A Degraded=True condition with reason InvalidSpec on the object.
async fn reported_invalid(api: &Api<DynamicObject>, name: &str) -> bool {
    let obj = api.get(name).await.unwrap();
    obj.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Degraded" && c["status"] == "True" && c["reason"] == "InvalidSpec"
            })
        })
}
