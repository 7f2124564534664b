//! Two replicas of the real operator binary with leader election: only the
//! Lease holder reconciles; when it is killed, the other takes over once the
//! Lease expires.

use std::process::Stdio;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::ec2peer::{self, PeerEnv};
use crate::testbed::{self, is_ready, wait_for};

const LEASE: &str = "ami-copy-operator";

struct Replica {
    name: &'static str,
    metrics_port: u16,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(name: &'static str, ns: &str, ec2_endpoint: &str) -> Replica {
    let metrics_port = free_port();
    let kubeconfig =
        std::env::var("AMICOPY_KUBECONFIG").expect("AMICOPY_KUBECONFIG is set by hack/test.sh");
    let child = Command::new(env!("CARGO_BIN_EXE_ami-copy-operator"))
        .args(["run", "--namespace", ns, "--ec2-endpoint-url", ec2_endpoint])
        .args(["--sts-endpoint-url", ec2_endpoint])
        .args([
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--poll-interval",
            "300ms",
        ])
        .args([
            "--leader-election",
            "--leader-election-namespace",
            ns,
            "--lease-duration",
            "3s",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("AWS_ACCESS_KEY_ID", ec2peer::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", ec2peer::SECRET_ACCESS_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the operator binary");
    Replica {
        name,
        metrics_port,
        child,
    }
}

/// Reconciles a replica has run, read from its own /metrics endpoint.
async fn reconciles(replica: &Replica) -> u64 {
    let mut conn = TcpStream::connect(("127.0.0.1", replica.metrics_port))
        .await
        .expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| l.starts_with("amicopy_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn wait_metrics(replica: &Replica) {
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", replica.metrics_port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never served /metrics", replica.name);
}

async fn holder(kube: &Client, ns: &str) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(kube.clone(), ns);
    api.get_opt(LEASE).await.ok()??.spec?.holder_identity
}

async fn wait_holder(kube: &Client, ns: &str, want: &str) {
    for _ in 0..300 {
        if holder(kube, ns).await.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{want} never became the leader; holder is {:?}",
        holder(kube, ns).await
    );
}

async fn copy(api: &Api<AmiCopy>, env: &PeerEnv, name: &str) {
    let source = ec2peer::seed_image(
        &env.client("us-east-1"),
        "us-east-1",
        &ec2peer::unique(name),
        &[],
    )
    .await;
    let obj: AmiCopy = serde_json::from_value(json!({
        "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "metadata": {"name": name},
        "spec": {"source": {"region": "us-east-1", "imageId": source.image_id}, "destinations": [{"region": "eu-west-1"}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create the AmiCopy");
    wait_for(api, name, "Ready=True", is_ready).await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_killed_leader_is_replaced() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "leader").await;
    let env = PeerEnv::with_sim(ec2peer::sim_config()).await;
    let api: Api<AmiCopy> = Api::namespaced(kube.clone(), &ns);

    let mut a = spawn("replica-a", &ns, env.endpoint());
    wait_holder(&kube, &ns, "replica-a").await;
    let b = spawn("replica-b", &ns, env.endpoint());
    wait_metrics(&a).await;
    wait_metrics(&b).await;

    copy(&api, &env, "first").await;
    assert!(reconciles(&a).await > 0, "the leader reconciled");
    assert_eq!(reconciles(&b).await, 0, "the standby did not");
    assert_eq!(holder(&kube, &ns).await.as_deref(), Some("replica-a"));

    // SIGKILL: no chance to release the Lease; it must expire.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    wait_holder(&kube, &ns, "replica-b").await;
    copy(&api, &env, "second").await;
    assert!(reconciles(&b).await > 0, "the new leader reconciles");
}
