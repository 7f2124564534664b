//! AmiCopyPolicy in a shared cluster, as a tenant meets it: refused at
//! admission by the chart's ValidatingAdmissionPolicy (the cases of
//! `tests/policy/cases.yaml`, which the operator's unit tests judge too),
//! unable to write a policy, and, for an object admitted before a policy
//! tightened, `PolicyDenied` with the sharing taken away in EC2. And the
//! operator's telemetry never carries a role ARN or an external ID.

use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::policy::AmiCopyPolicy;
use ec2_sim::{Permission, SeedImage};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::chart::{apply_all, render};
use crate::operator::{Peer, create, target_of};
use crate::reliability::harness;
use crate::testbed::{self, Operator, is_ready, wait_for};

const SOURCE_REGION: &str = "us-east-1";

#[derive(Deserialize)]
struct Table {
    policy: Value,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    spec: Value,
    denied: Vec<String>,
    #[serde(default)]
    values: Vec<String>,
}

fn table() -> Table {
    serde_yaml::from_str(include_str!("../policy/cases.yaml")).expect("the cases parse")
}

/// A namespace that opts into its own policy (`amicopy.dev/policy`), and a
/// policy of that name selecting it with `spec`.
async fn governed_namespace(admin: &Client, prefix: &str, spec: &Value) -> String {
    let ns = testbed::namespace(admin, prefix).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    let label = json!({"metadata": {"labels": {"amicopy.dev/policy": ns}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label the namespace");
    let mut spec = spec.clone();
    spec["namespaceSelector"] = json!({"matchLabels": {"amicopy.dev/policy": ns}});
    let policy: AmiCopyPolicy = serde_json::from_value(json!({
        "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopyPolicy",
        "metadata": {"name": ns}, "spec": spec,
    }))
    .expect("a policy");
    Api::<AmiCopyPolicy>::all(admin.clone())
        .create(&PostParams::default(), &policy)
        .await
        .expect("create the policy");
    ns
}

/// The chart's admission policy and tenant roles, applied for real (they
/// judge only namespaces an AmiCopyPolicy selects); the edit role's name.
async fn install_admission(admin: &Client) -> String {
    let objects: Vec<Value> = render("amicopy-policy", "amicopy-policy", &json!({}))
        .into_iter()
        .filter(|o| {
            let kind = o["kind"].as_str().unwrap();
            let name = o["metadata"]["name"].as_str().unwrap();
            kind.starts_with("ValidatingAdmissionPolicy")
                || (kind == "ClusterRole" && (name.ends_with("-edit") || name.ends_with("-view")))
        })
        .collect();
    assert_eq!(objects.len(), 4, "the policy, its binding, two roles");
    apply_all(admin, &objects, false).await;
    objects
        .iter()
        .find_map(|o| {
            o["metadata"]["name"]
                .as_str()
                .filter(|n| n.ends_with("-edit"))
        })
        .unwrap()
        .to_owned()
}

/// A client acting as `user`, bound to the chart's edit role in `ns`.
async fn tenant(admin: &Client, ns: &str, edit_role: &str) -> Client {
    let user = format!("tenant@{ns}");
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tenant", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": edit_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    apply_all(admin, &[serde_json::to_value(binding).unwrap()], false).await;
    let mut config = testbed::admin_config().await;
    config.auth_info.impersonate = Some(user);
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".into()]);
    Client::try_from(config).expect("an impersonating client")
}

fn manifest(name: &str, spec: &Value) -> AmiCopy {
    serde_json::from_value(
        json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
        "metadata": {"name": name}, "spec": spec}),
    )
    .expect("an AmiCopy")
}

/// Creates the object as the tenant: `Ok` if admitted (then deleted), the
/// API server's message if refused.
async fn try_create(api: &Api<AmiCopy>, name: &str, spec: &Value) -> Result<(), String> {
    match api
        .create(&PostParams::default(), &manifest(name, spec))
        .await
    {
        Ok(_) => {
            api.delete(name, &DeleteParams::default())
                .await
                .expect("delete the admitted object");
            Ok(())
        }
        Err(kube::Error::Api(e)) => Err(e.message),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[tokio::test]
async fn a_tenant_is_refused_at_admission_what_the_policy_does_not_allow() {
    let admin = testbed::kube().await;
    let edit = install_admission(&admin).await;
    let table = table();
    let ns = governed_namespace(&admin, "policy-admission", &table.policy).await;
    let client = tenant(&admin, &ns, &edit).await;
    let api: Api<AmiCopy> = Api::namespaced(client.clone(), &ns);

    // The API server takes a moment to load the policy and its parameter.
    let first = table.cases.iter().find(|c| !c.denied.is_empty()).unwrap();
    harness::until("the admission policy in force", || {
        let (api, spec) = (api.clone(), first.spec.clone());
        async move { try_create(&api, "probe", &spec).await.is_err() }
    })
    .await;

    let mut refused = 0;
    for (i, case) in table.cases.iter().enumerate() {
        let name = format!("case-{i}");
        match (
            try_create(&api, &name, &case.spec).await,
            case.denied.first(),
        ) {
            (Ok(()), None) => {}
            (Err(message), Some(rule)) => {
                refused += 1;
                let want = format!("AmiCopyPolicy {ns} does not allow {rule} ");
                assert!(message.contains(&want), "{}: {message}", case.name);
                for value in &case.values {
                    assert!(
                        message.contains(&format!("\"{value}\"")),
                        "{}: {message}",
                        case.name
                    );
                }
            }
            (Ok(()), Some(rule)) => panic!("{}: admitted, {rule} should refuse it", case.name),
            (Err(message), None) => panic!("{}: refused: {message}", case.name),
        }
    }
    assert!(refused >= 10, "every rule refused something: {refused}");

    // Policies are the cluster admin's: the tenant can neither write nor
    // remove one, not even the one that governs its namespace.
    let policies: Api<AmiCopyPolicy> = Api::all(client);
    let open: AmiCopyPolicy = serde_json::from_value(json!({
        "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopyPolicy",
        "metadata": {"name": format!("{ns}-open")}, "spec": {"regions": ["*"]},
    }))
    .unwrap();
    let forbidden = |res: Result<_, kube::Error>, what: &str| match res {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{what}: {}", e.message),
        other => panic!("{what}: {other:?}"),
    };
    forbidden(
        policies
            .create(&PostParams::default(), &open)
            .await
            .map(|_| ()),
        "create",
    );
    let widen = json!({"spec": {"regions": ["*"]}});
    forbidden(
        policies
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&widen))
            .await
            .map(|_| ()),
        "patch",
    );
    forbidden(
        policies
            .delete(&ns, &DeleteParams::default())
            .await
            .map(|_| ()),
        "delete",
    );
    Api::<AmiCopyPolicy>::all(admin)
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("the admin removes the policy");
}

/// An object admitted while its namespace allowed sharing with two accounts
/// and the snapshots; then the policy is tightened to one account, no
/// snapshots. The object goes `PolicyDenied`, and EC2 shows the other
/// account's permissions and the snapshots' taken away.
#[tokio::test]
async fn an_object_admitted_before_a_policy_tightened_loses_what_it_no_longer_allows() {
    const KEPT: &str = "444400001111";
    const DROPPED: &str = "999900001111";
    let admin = testbed::kube().await;
    let peer = Peer::with_sim(crate::ec2peer::sim_config()).await;
    let open = json!({"sourceOwners": ["*"], "sharing": {"accounts": ["*"], "snapshots": true}});
    let ns = governed_namespace(&admin, "policy-tightened", &open).await;
    let op = Operator::start(&admin, &ns, peer.env.endpoint()).await;
    let api: Api<AmiCopy> = Api::namespaced(admin.clone(), &ns);
    let source = peer.seed_source("tightened").await;
    create(
        &api,
        "shared",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}],
               "sharing": {"accounts": [KEPT, DROPPED], "snapshots": true}}),
    )
    .await;
    let shared = wait_for(&api, "shared", "shared with both accounts", |o| {
        is_ready(o)
            && o.status
                .as_ref()
                .is_some_and(|s| s.destinations[0].shared_with.len() == 4)
    })
    .await;
    let id = target_of(&shared, "eu-west-1").unwrap();
    let control = peer.control();
    let img = control.image(&id).unwrap();
    assert_eq!(img.launch_permissions.len(), 2);

    let tight = json!({"spec": {"sharing": {"accounts": [KEPT], "snapshots": false}}});
    Api::<AmiCopyPolicy>::all(admin.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&tight))
        .await
        .expect("tighten the policy");
    let denied = wait_for(&api, "shared", "PolicyDenied, one account left", |o| {
        harness::condition_of(o, "Degraded").is_some_and(|(_, reason, _)| reason == "PolicyDenied")
            && o.status
                .as_ref()
                .is_some_and(|s| s.destinations[0].shared_with == [format!("account:{KEPT}")])
    })
    .await;
    let (_, _, message) = harness::condition_of(&denied, "Degraded").unwrap();
    assert!(
        message.contains(&format!("sharing.accounts \"{DROPPED}\""))
            && message.contains("sharing.snapshots"),
        "{message}"
    );
    let img = control.image(&id).unwrap();
    assert_eq!(
        img.launch_permissions,
        vec![Permission::UserId(KEPT.into())],
        "EC2 keeps only what the policy allows"
    );
    for snap in img.snapshot_ids() {
        assert!(
            control
                .snapshot(snap)
                .unwrap()
                .create_volume_permissions
                .is_empty(),
            "no snapshot shared"
        );
    }
    assert!(is_ready(&denied), "the copy itself stays");
    testbed::delete(&api, "shared").await;
    testbed::wait_gone(&api, "shared").await;
    Api::<AmiCopyPolicy>::all(admin)
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("remove the policy");
    op.stop().await;
}

/// A cross-account destination through a role with an external ID: the
/// operator's /metrics and its log name the account at most, never the
/// role's ARN nor the external ID.
#[tokio::test]
async fn telemetry_carries_no_role_arn_and_no_external_id() {
    const OTHER: &str = "222233334444";
    const EXTERNAL_ID: &str = "tenant-chosen-secret-7f3a";
    let role = format!("arn:aws:iam::{OTHER}:role/telemetry-copier");
    let bed = harness::bed("telemetry", 91, Duration::from_millis(300)).await;
    bed.sim.update_config(|c| {
        c.roles.insert(role.clone(), Some(EXTERNAL_ID.into()));
    });
    let source = bed.sim.seed_image(SeedImage {
        region: SOURCE_REGION.into(),
        name: "telemetry".into(),
        launch_permissions: vec![Permission::UserId(OTHER.into())],
        ..SeedImage::default()
    });
    let src = bed.sim.image(&source).unwrap();
    let ec2 = crate::ec2peer::client(&bed.sim.endpoint(), SOURCE_REGION);
    for snap in src.snapshot_ids() {
        let add = aws_sdk_ec2::types::CreateVolumePermission::builder()
            .user_id(OTHER)
            .build();
        ec2.modify_snapshot_attribute()
            .snapshot_id(snap)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .create_volume_permission(
                aws_sdk_ec2::types::CreateVolumePermissionModifications::builder()
                    .add(add)
                    .build(),
            )
            .send()
            .await
            .expect("share the source's snapshot");
    }
    let mut op = bed.launch.spawn();
    harness::create(
        &bed.api,
        "across",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1", "roleArn": role, "externalId": EXTERNAL_ID}]}),
    )
    .await;
    let ready = wait_for(&bed.api, "across", "Ready=True", is_ready).await;
    let copy = bed
        .sim
        .image(&target_of(&ready, "eu-west-1").unwrap())
        .unwrap();
    assert_eq!(copy.owner, OTHER, "copied through the role");
    let metrics = op.metrics().await;
    let text = metrics.text();
    assert!(text.contains("amicopy_copies_started_total"), "{text}");
    for secret in [role.as_str(), EXTERNAL_ID] {
        assert!(!text.contains(secret), "/metrics names {secret}:\n{text}");
        let log = std::fs::read_to_string(bed.launch.log_path()).unwrap();
        assert!(!log.contains(secret), "the log names {secret}");
    }
    testbed::delete(&bed.api, "across").await;
    testbed::wait_gone(&bed.api, "across").await;
    op.kill().await;
}

/// A role the policy does not allow (any more: the object was admitted
/// before the policy was tightened, while no operator ran) is never
/// assumed, not to copy, not to look, not to clean up: the destination is
/// `PolicyDenied`, the allowed one is copied, and the simulator's STS sees
/// no AssumeRole at all.
#[tokio::test]
async fn a_refused_role_is_never_assumed() {
    let admin = testbed::kube().await;
    let mut config = crate::ec2peer::sim_config();
    let role = "arn:aws:iam::222233334444:role/someone-elses-copier";
    config.roles.insert(role.into(), None);
    let peer = Peer::with_sim(config).await;
    let ns = governed_namespace(&admin, "policy-role", &json!({"roles": [{"arn": "*"}]})).await;
    let api: Api<AmiCopy> = Api::namespaced(admin.clone(), &ns);
    let source = peer.seed_source("role").await;
    create(
        &api,
        "reach",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}, {"region": "us-west-2", "roleArn": role}]}),
    )
    .await;
    let tight = json!({"spec": {"roles": []}});
    Api::<AmiCopyPolicy>::all(admin.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&tight))
        .await
        .expect("tighten the policy");
    let op = Operator::start(&admin, &ns, peer.env.endpoint()).await;
    let denied = wait_for(&api, "reach", "eu-west-1 copied, us-west-2 refused", |o| {
        let refused = o.status.as_ref().is_some_and(|s| {
            s.destinations
                .iter()
                .any(|d| d.region == "us-west-2" && d.reason.as_deref() == Some("PolicyDenied"))
        });
        refused
            && target_of(o, "eu-west-1").is_some_and(|id| {
                peer.control()
                    .image(&id)
                    .is_some_and(|i| i.state.as_str() == "available")
            })
    })
    .await;
    let (_, reason, message) = harness::condition_of(&denied, "Degraded").unwrap();
    assert_eq!(reason, "PolicyDenied");
    assert!(message.contains(&format!("roles \"{role}\"")), "{message}");
    testbed::delete(&api, "reach").await;
    testbed::wait_gone(&api, "reach").await;
    let assumed: Vec<_> = peer
        .control()
        .calls()
        .into_iter()
        .filter(|c| c.action == "AssumeRole")
        .collect();
    assert!(
        assumed.is_empty(),
        "the refused role was assumed: {assumed:?}"
    );
    Api::<AmiCopyPolicy>::all(admin)
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("remove the policy");
    op.stop().await;
}
