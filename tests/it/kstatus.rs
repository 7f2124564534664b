//! What Flux (and kpt, and cli-utils) make of AmiCopies: objects the
//! operator really produced against the test bed, judged by the kstatus
//! library itself (built from `sigs.k8s.io/cli-utils` by
//! `hack/testbed/build.sh kstatus`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ami_copy_operator::AmiCopy;
use ec2_sim::SeedImage;
use kube::api::Api;
use serde_json::json;

use crate::operator::{Peer, create, patch_spec};
use crate::testbed::{self, Operator, is_ready, wait_for};

const SOURCE_REGION: &str = "us-east-1";

fn kstatus() -> PathBuf {
    testbed::testbed_program("AMICOPY_KSTATUS", "CLI_UTILS_VERSION", "kstatus", "kstatus")
}

/// kstatus' verdict on `obj`: its status and message.
fn verdict(obj: &AmiCopy) -> (String, String) {
    let mut child = Command::new(kstatus())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run kstatus");
    let line = serde_json::to_string(obj).expect("the object as JSON");
    writeln!(child.stdin.take().unwrap(), "{line}").unwrap();
    let out = child.wait_with_output().expect("kstatus answers");
    assert!(out.status.success(), "kstatus failed on {line}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.trim_end().split_once('\t').expect("status\tmessage");
    (status.to_owned(), message.to_owned())
}

#[tokio::test]
async fn kstatus_reads_copying_as_in_progress_ready_as_current_and_degraded_as_failed() {
    // Copies slow enough for `pending` to be seen.
    let peer = Peer::sim().await;
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "kstatus").await;
    let api: Api<AmiCopy> = Api::namespaced(kube.clone(), &ns);
    let op = Operator::start(&kube, &ns, peer.env.endpoint()).await;
    let source = peer.seed_source("kstatus").await;
    let mut seen = Vec::new();

    create(
        &api,
        "copying",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}]}),
    )
    .await;
    let pending = wait_for(&api, "copying", "a copy pending", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.destinations
                .first()
                .is_some_and(|d| d.state.as_str() == "pending" && d.image_id.is_some())
        })
    })
    .await;
    seen.push(("copying", verdict(&pending), "InProgress"));
    let ready = wait_for(&api, "copying", "Ready=True", is_ready).await;
    seen.push(("ready", verdict(&ready), "Current"));

    create(
        &api,
        "missing",
        json!({"source": {"region": SOURCE_REGION, "imageId": "ami-0000000000000000f"},
               "destinations": [{"region": "eu-west-1"}]}),
    )
    .await;
    let missing = wait_for(&api, "missing", "SourceNotFound", |o| {
        crate::reliability::harness::condition_of(o, "Degraded")
            .is_some_and(|(s, r, _)| s == "True" && r == "SourceNotFound")
    })
    .await;
    seen.push(("source not found", verdict(&missing), "Failed"));

    // A name already taken in the destination region by another image.
    peer.control().seed_image(SeedImage {
        region: "us-west-2".into(),
        name: format!("taken-{source}"),
        ..SeedImage::default()
    });
    create(
        &api,
        "taken",
        json!({"source": {"region": SOURCE_REGION, "imageId": source}, "name": "taken",
               "destinations": [{"region": "us-west-2"}]}),
    )
    .await;
    let taken = wait_for(&api, "taken", "DuplicateName", |o| {
        crate::reliability::harness::condition_of(o, "Degraded")
            .is_some_and(|(s, r, _)| s == "True" && r == "DuplicateName")
    })
    .await;
    seen.push(("duplicate name", verdict(&taken), "Failed"));

    // A spec change the operator has not seen yet.
    op.stop().await;
    patch_spec(
        &api,
        "copying",
        json!({"destinations": [{"region": "eu-west-1"}, {"region": "ap-southeast-2"}]}),
    )
    .await;
    let changed = api.get("copying").await.unwrap();
    seen.push((
        "spec changed, not yet observed",
        verdict(&changed),
        "InProgress",
    ));

    if let Some(dir) = std::env::var_os("AMICOPY_DUMP_OBJECTS") {
        // How the Argo CD health check's testdata were taken.
        for (file, obj) in [
            ("copying", &pending),
            ("ready", &ready),
            ("source-not-found", &missing),
            ("duplicate-name", &taken),
            ("spec-changed", &changed),
        ] {
            let mut obj = obj.clone();
            obj.metadata.managed_fields = None;
            let yaml = serde_yaml::to_string(&obj).unwrap();
            std::fs::write(
                std::path::Path::new(&dir).join(format!("{file}.yaml")),
                yaml,
            )
            .unwrap();
        }
    }
    for (what, (status, message), want) in &seen {
        eprintln!("kstatus: {what}: {status} ({message})");
        assert_eq!(status, want, "{what}: {message}");
    }
    let op = Operator::start(&kube, &ns, peer.env.endpoint()).await;
    for name in ["copying", "missing", "taken"] {
        testbed::delete(&api, name).await;
        testbed::wait_gone(&api, name).await;
    }
    op.stop().await;
}
