//! The Helm chart in `charts/ami-copy-operator`: `helm lint` and
//! `helm template` with default and other values, values refused by the
//! schema, the rendered manifests accepted by the test bed's kube-apiserver
//! (server-side dry run), and its RBAC proven three ways: the rendered rules
//! are exactly the expected set, SubjectAccessReviews against the real API
//! server allow and deny what they should, and the operator running as the
//! chart's ServiceAccount completes a copy-and-delete cycle.
//!
//! helm comes from `AMICOPY_HELM` (set by hack/test.sh), else from the test
//! bed's build cache (`hack/testbed/build.sh helm`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ami_copy_operator::leader::{self, LeaseConfig};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::discovery::{self, Scope};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};

use crate::operator::{Peer, Setup, copy_two_regions_then_delete_with};
use crate::testbed::{self, Operator, WAIT};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ami-copy-operator");
const FIELD_MANAGER: &str = "amicopy-chart-tests";

fn helm() -> PathBuf {
    testbed::testbed_program("AMICOPY_HELM", "HELM_VERSION", "helm", "helm")
}

/// Runs helm with `values` on stdin (`-f -`); Ok(stdout) or Err(stderr).
fn run_helm(args: &[&str], values: &Value) -> Result<String, String> {
    let mut child = Command::new(helm())
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start helm");
    child
        .stdin
        .take()
        .expect("helm's stdin")
        .write_all(values.to_string().as_bytes())
        .expect("write values to helm");
    let out = child.wait_with_output().expect("wait for helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template` of the chart as release `release` in `namespace`: the
/// rendered objects.
pub(crate) fn render(release: &str, namespace: &str, values: &Value) -> Vec<Value> {
    let yaml = run_helm(
        &["template", release, CHART, "--namespace", namespace],
        values,
    )
    .unwrap_or_else(|e| panic!("helm template failed with {values}: {e}"));
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match of_kind(objects, kind).as_slice() {
        [o] => o,
        other => panic!("expected one {kind}, found {}", other.len()),
    }
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn container(objects: &[Value]) -> &Value {
    &one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args(objects: &[Value]) -> Vec<String> {
    serde_json::from_value(container(objects)["args"].clone()).expect("args")
}

fn env_value<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    container(objects)["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

/// Values worth rendering besides the defaults, by name.
fn variants() -> Vec<(&'static str, Value)> {
    vec![
        ("default", json!({})),
        (
            "namespaced",
            json!({"watchNamespace": "team-images", "logFormat": "json", "logLevel": "debug"}),
        ),
        (
            "replicas-2",
            json!({"replicas": 2, "leaderElection": {"leaseDuration": "20s"}}),
        ),
        (
            "service-monitor",
            json!({"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}}),
        ),
        (
            "irsa",
            json!({"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/ami-copy-operator"}},
                   "aws": {"region": "eu-west-1", "ec2EndpointUrl": "https://ec2.eu-west-1.amazonaws.com"}}),
        ),
        (
            "everything",
            json!({"watchNamespace": "team-images", "replicas": 3, "serviceMonitor": {"enabled": true},
                   "image": {"repository": "registry.example/ami-copy-operator", "tag": "v9", "pullPolicy": "Always"},
                   "pollInterval": "5s", "resyncInterval": "1h", "metrics": {"port": 9090},
                   "podAnnotations": {"example.com/team": "images"}, "nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                   "crds": {"install": false}, "env": [{"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"}],
                   "networkPolicy": {"enabled": true}}),
        ),
    ]
}

#[test]
fn chart_crds_are_byte_for_byte_copies_of_crds_dir() {
    let pairs = [
        (
            include_str!("../../charts/ami-copy-operator/files/amicopy.dev_amicopies.yaml"),
            include_str!("../../crds/amicopy.dev_amicopies.yaml"),
            ami_copy_operator::crd_yaml(),
            "amicopy.dev_amicopies.yaml",
        ),
        (
            include_str!("../../charts/ami-copy-operator/files/amicopy.dev_amicopypolicies.yaml"),
            include_str!("../../crds/amicopy.dev_amicopypolicies.yaml"),
            ami_copy_operator::policy_crd_yaml(),
            "amicopy.dev_amicopypolicies.yaml",
        ),
    ];
    for (chart, committed, generated, file) in pairs {
        assert!(
            chart == committed,
            "charts/ami-copy-operator/files/{file} differs from crds/: cp crds/{file} charts/ami-copy-operator/files/"
        );
        assert_eq!(chart, generated, "{file}: and both from the Rust types");
    }
}

#[test]
fn helm_lint_passes_for_every_variant() {
    for (name, values) in variants() {
        run_helm(&["lint", "--strict", CHART], &values)
            .unwrap_or_else(|e| panic!("helm lint --strict failed for {name}: {e}"));
    }
}

#[test]
fn default_render_is_a_hardened_single_replica_cluster_wide_operator() {
    let objects = render("amicopy", "ops", &json!({}));
    assert_eq!(
        kinds(&objects),
        [
            "AmiCopyPolicy",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
        .map(String::from)
        .into()
    );
    let cluster_scoped = [
        "AmiCopyPolicy",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for o in &objects {
        if !cluster_scoped.contains(&o["kind"].as_str().unwrap())
            && !o["kind"].as_str().unwrap().starts_with("Cluster")
        {
            assert_eq!(o["metadata"]["namespace"], "ops", "{}", o["kind"]);
        }
    }

    let deploy = one(&objects, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 1);
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "amicopy-ami-copy-operator");
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = container(&objects);
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(c["image"], "ghcr.io/amicopy-dev/ami-copy-operator:0.1.0");
    assert_eq!(
        args(&objects),
        [
            "run",
            "--metrics-addr=0.0.0.0:8080",
            "--poll-interval=15s",
            "--resync-interval=10m",
            "--max-retry-delay=5m",
            "--tracking=batched",
            "--copy-limit-per-region=50",
            "--copy-limit-per-source-region=25",
            "--max-concurrent-reconciles=16",
            "--worker-threads=1",
            "--source-refresh-interval=10m",
            "--in-use-recheck-interval=5m",
            "--ssm-parameter-prefix=/amicopy/",
            "--default-policy={\"kmsKeys\":[\"destination-account\"],\"regions\":[\"*\"],\"roles\":[],\"sharing\":{\"accounts\":[],\"organizationalUnits\":[],\"organizations\":[],\"public\":false,\"snapshots\":false},\"sourceOwners\":[\"self\"]}",
            "--log-format=text"
        ]
    );
    // The default policy the chart creates is the one the operator applies
    // where no policy selects a namespace.
    let policy = one(&objects, "AmiCopyPolicy");
    let flag = args(&objects)
        .into_iter()
        .find_map(|a| a.strip_prefix("--default-policy=").map(str::to_owned))
        .unwrap();
    let mut spec = policy["spec"].clone();
    spec.as_object_mut().unwrap().remove("namespaceSelector");
    assert_eq!(spec, serde_json::from_str::<Value>(&flag).unwrap());
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/livez", "port": "metrics"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env_value(&objects, name).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            field
        );
    }
    assert_eq!(env_value(&objects, "RUST_LOG").unwrap()["value"], "info");
    assert!(env_value(&objects, "AWS_REGION").is_none());

    let service = one(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        service["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );

    // The CRD template renders crds/ plus the keep policy and the chart's labels.
    let crds = of_kind(&objects, "CustomResourceDefinition");
    assert_eq!(crds.len(), 2, "AmiCopy and AmiCopyPolicy");
    let crd = crds
        .iter()
        .find(|c| c["metadata"]["name"] == "amicopies.amicopy.dev")
        .unwrap();
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let committed: Value =
        serde_yaml::from_str(include_str!("../../crds/amicopy.dev_amicopies.yaml")).unwrap();
    // Helm's toYaml writes the schema's `minimum: 0.0` as `0`: the same number.
    assert_eq!(
        integral(crd["spec"].clone()),
        integral(committed["spec"].clone())
    );
    assert_eq!(crd["metadata"]["name"], committed["metadata"]["name"]);
}

/// Whole floats as integers, so that `0.0` and `0` compare equal.
fn integral(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, integral(v))).collect()),
        other => other,
    }
}

#[test]
fn other_values_render_as_documented() {
    let namespaced = render("amicopy", "ops", &variants()[1].1);
    for kind in ["Role", "RoleBinding"] {
        assert_eq!(
            one(&namespaced, kind)["metadata"]["namespace"],
            "team-images"
        );
    }
    // Cluster-wide, only what is cluster-scoped: reading the policies and
    // the namespaces' labels (and the tenants' aggregated roles).
    let cluster_roles: BTreeSet<&str> = of_kind(&namespaced, "ClusterRole")
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cluster_roles,
        BTreeSet::from([
            "amicopy-ami-copy-operator-edit",
            "amicopy-ami-copy-operator-policies",
            "amicopy-ami-copy-operator-view"
        ])
    );
    assert_eq!(of_kind(&namespaced, "ClusterRoleBinding").len(), 1);
    assert_eq!(
        one(&namespaced, "RoleBinding")["subjects"],
        json!([{"kind": "ServiceAccount", "name": "amicopy-ami-copy-operator", "namespace": "ops"}])
    );
    assert!(args(&namespaced).contains(&"--namespace=team-images".into()));
    assert!(args(&namespaced).contains(&"--log-format=json".into()));
    assert_eq!(
        env_value(&namespaced, "RUST_LOG").unwrap()["value"],
        "debug"
    );

    let replicated = render("amicopy", "ops", &variants()[2].1);
    let deploy = one(&replicated, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    let a = args(&replicated);
    for flag in [
        "--leader-election",
        "--lease-name=amicopy-ami-copy-operator",
        "--lease-duration=20s",
    ] {
        assert!(a.contains(&flag.to_owned()), "{flag} in {a:?}");
    }
    let lease_roles: Vec<_> = of_kind(&replicated, "Role");
    assert_eq!(lease_roles.len(), 1);
    // More than one replica: a drain leaves one running.
    let pdb = one(&replicated, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    assert!(of_kind(&render("amicopy", "ops", &json!({})), "PodDisruptionBudget").is_empty());
    assert_eq!(lease_roles[0]["metadata"]["namespace"], "ops");
    // One replica with leaderElection.enabled gets the same; without, none of it.
    let single = render(
        "amicopy",
        "ops",
        &json!({"leaderElection": {"enabled": true}}),
    );
    assert!(args(&single).contains(&"--leader-election".into()));
    assert_eq!(of_kind(&single, "Role").len(), 1);
    assert!(!args(&render("amicopy", "ops", &json!({}))).contains(&"--leader-election".into()));

    let monitored = render("amicopy", "ops", &variants()[3].1);
    let sm = one(&monitored, "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        one(&monitored, "Service")["spec"]["selector"]
    );

    let irsa = render("amicopy", "ops", &variants()[4].1);
    assert_eq!(
        one(&irsa, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::111122223333:role/ami-copy-operator"
    );
    assert_eq!(
        env_value(&irsa, "AWS_REGION").unwrap()["value"],
        "eu-west-1"
    );
    assert!(args(&irsa).contains(&"--ec2-endpoint-url=https://ec2.eu-west-1.amazonaws.com".into()));

    let everything = render("amicopy", "ops", &variants()[5].1);
    assert!(of_kind(&everything, "CustomResourceDefinition").is_empty());
    // Only the monitoring namespace reaches the metrics port.
    let np = one(&everything, "NetworkPolicy");
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"],
        json!({"kubernetes.io/metadata.name": "monitoring"})
    );
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    assert!(of_kind(&render("amicopy", "ops", &json!({})), "NetworkPolicy").is_empty());
    let c = container(&everything);
    assert_eq!(c["image"], "registry.example/ami-copy-operator:v9");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert!(args(&everything).contains(&"--metrics-addr=0.0.0.0:9090".into()));
    assert!(args(&everything).contains(&"--poll-interval=5s".into()));
    let tuned = args(&render(
        "amicopy",
        "ops",
        &json!({"tracking": "per-object", "copyLimits": {"perRegion": 20, "perSourceRegion": 10},
                "maxConcurrentReconciles": 4, "allowPublicImages": true, "workerThreads": 2,
                "inUseRecheckInterval": "1h", "ssmParameterPrefix": "/images/",
                "aws": {"stsEndpointUrl": "https://sts.eu-west-1.amazonaws.com",
                        "ssmEndpointUrl": "https://ssm.eu-west-1.amazonaws.com"}}),
    ));
    for flag in [
        "--tracking=per-object",
        "--copy-limit-per-region=20",
        "--copy-limit-per-source-region=10",
        "--max-concurrent-reconciles=4",
        "--worker-threads=2",
        "--allow-public-images",
        "--sts-endpoint-url=https://sts.eu-west-1.amazonaws.com",
        "--ssm-endpoint-url=https://ssm.eu-west-1.amazonaws.com",
        "--in-use-recheck-interval=1h",
        "--ssm-parameter-prefix=/images/",
    ] {
        assert!(tuned.contains(&flag.to_owned()), "{flag} in {tuned:?}");
    }
    assert_eq!(
        env_value(&everything, "AWS_STS_REGIONAL_ENDPOINTS").unwrap()["value"],
        "regional"
    );
    let pod = &one(&everything, "Deployment")["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["example.com/team"], "images");
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "dedicated");
}

#[test]
fn schema_refuses_bad_values() {
    let cases = [
        (json!({"replicas": -1}), "/replicas"),
        (json!({"replicas": "two"}), "/replicas"),
        (json!({"logFormat": "xml"}), "/logFormat"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (json!({"pollInterval": "fast"}), "/pollInterval"),
        (json!({"resyncInterval": 600}), "/resyncInterval"),
        (json!({"tracking": "sometimes"}), "/tracking"),
        (json!({"workerThreads": 0}), "/workerThreads"),
        (
            json!({"copyLimits": {"perRegion": 0, "perSourceRegion": 25}}),
            "/copyLimits/perRegion",
        ),
        (json!({"metrics": {"port": 70000}}), "/metrics/port"),
        (json!({"watchNamespace": "Team_A"}), "/watchNamespace"),
        (json!({"aws": {"region": "Ireland"}}), "/aws/region"),
        (
            json!({"aws": {"ec2EndpointUrl": "ec2.local"}}),
            "/aws/ec2EndpointUrl",
        ),
        (
            json!({"serviceAccount": {"annotations": {"a": 1}}}),
            "/serviceAccount/annotations/a",
        ),
        (
            json!({"leaderElection": {"enabled": "yes"}}),
            "/leaderElection/enabled",
        ),
        (
            json!({"replica": 2}),
            "additional properties 'replica' not allowed",
        ),
        (
            json!({"serviceMonitor": {"enable": true}}),
            "additional properties 'enable' not allowed",
        ),
    ];
    for (values, expected) in cases {
        let err = run_helm(&["template", "amicopy", CHART], &values)
            .err()
            .unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(
            err.contains("don't meet the specifications of the schema") && err.contains(expected),
            "{values}: expected a schema error naming {expected}, got: {err}"
        );
    }
}

/// A rule as (apiGroup, resource, verb, resourceName), one tuple per
/// combination, so rule sets compare regardless of how they are grouped.
type Grant = (String, String, String, String);

fn grants(role: &Value) -> BTreeSet<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names = match strings(&rule["resourceNames"]) {
            n if n.is_empty() => vec![String::new()],
            n => n,
        };
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    for n in &names {
                        out.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn expected(list: &[(&str, &str, &str, &str)]) -> BTreeSet<Grant> {
    list.iter()
        .map(|(g, r, v, n)| (g.to_string(), r.to_string(), v.to_string(), n.to_string()))
        .collect()
}

/// What the controller uses: list/watch (and get) AmiCopies, patch them for
/// the finalizer, patch their status (server-side apply), create and patch
/// events.k8s.io Events.
const OPERATOR_GRANTS: &[(&str, &str, &str, &str)] = &[
    ("amicopy.dev", "amicopies", "get", ""),
    ("amicopy.dev", "amicopies", "list", ""),
    ("amicopy.dev", "amicopies", "watch", ""),
    ("amicopy.dev", "amicopies", "patch", ""),
    ("amicopy.dev", "amicopies/status", "get", ""),
    ("amicopy.dev", "amicopies/status", "patch", ""),
    ("", "configmaps", "get", ""),
    ("", "configmaps", "patch", ""),
    ("events.k8s.io", "events", "create", ""),
    ("events.k8s.io", "events", "patch", ""),
];

/// What the controller reads cluster-wide, whatever it watches: the
/// AmiCopyPolicies and the namespaces' labels they select by.
const POLICY_GRANTS: &[(&str, &str, &str, &str)] = &[
    ("amicopy.dev", "amicopypolicies", "get", ""),
    ("amicopy.dev", "amicopypolicies", "list", ""),
    ("amicopy.dev", "amicopypolicies", "watch", ""),
    ("", "namespaces", "get", ""),
    ("", "namespaces", "list", ""),
    ("", "namespaces", "watch", ""),
];

#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let lease = |name: &str| {
        expected(&[
            ("coordination.k8s.io", "leases", "create", ""),
            ("coordination.k8s.io", "leases", "get", name),
            ("coordination.k8s.io", "leases", "patch", name),
        ])
    };
    for (name, values) in variants() {
        let objects = render("amicopy", "ops", &values);
        for o in &objects {
            if ["ClusterRole", "Role"].contains(&o["kind"].as_str().unwrap()) {
                let rules = o["rules"].to_string();
                assert!(!rules.contains('*'), "{name}: a wildcard in {rules}");
                assert!(!rules.contains("secrets"), "{name}: secrets in {rules}");
            }
        }
        let cluster_role = |suffix: &str| {
            of_kind(&objects, "ClusterRole")
                .into_iter()
                .find(|r| r["metadata"]["name"] == format!("amicopy-ami-copy-operator{suffix}"))
                .unwrap_or_else(|| panic!("{name}: ClusterRole amicopy-ami-copy-operator{suffix}"))
        };
        match values["watchNamespace"].as_str() {
            Some(ns) => {
                let role = of_kind(&objects, "Role")
                    .into_iter()
                    .find(|r| r["metadata"]["namespace"] == ns)
                    .expect("a Role in the watched namespace");
                assert_eq!(grants(role), expected(OPERATOR_GRANTS), "{name}");
                assert_eq!(
                    grants(cluster_role("-policies")),
                    expected(POLICY_GRANTS),
                    "{name}"
                );
            }
            None => {
                let all: Vec<_> = OPERATOR_GRANTS
                    .iter()
                    .chain(POLICY_GRANTS)
                    .copied()
                    .collect();
                assert_eq!(grants(cluster_role("")), expected(&all), "{name}");
            }
        }
        // Tenants: namespace editors manage AmiCopies, and nobody but the
        // cluster admin writes an AmiCopyPolicy.
        for suffix in ["-edit", "-view"] {
            let tenant = grants(cluster_role(suffix));
            assert!(
                tenant.iter().all(|(_, r, v, _)| r != "amicopypolicies"
                    || ["get", "list", "watch"].contains(&v.as_str())),
                "{name}{suffix}: {tenant:?}"
            );
        }

        let lease_roles: Vec<_> = of_kind(&objects, "Role")
            .into_iter()
            .filter(|r| {
                r["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("-leader-election")
            })
            .collect();
        let leader = values["replicas"].as_i64().unwrap_or(1) > 1;
        assert_eq!(lease_roles.len(), usize::from(leader), "{name}");
        if let Some(role) = lease_roles.first() {
            assert_eq!(
                role["metadata"]["namespace"], "ops",
                "leases only in the release namespace"
            );
            assert_eq!(grants(role), lease("amicopy-ami-copy-operator"), "{name}");
        }
    }
}

static SERVICE_MONITOR_CRD: OnceCell<()> = OnceCell::const_new();

/// prometheus-operator's ServiceMonitor kind, reduced to what the API server
/// needs to accept one (any content).
async fn install_service_monitor_crd(client: &Client) {
    SERVICE_MONITOR_CRD
        .get_or_init(|| async {
            let crd: CustomResourceDefinition = serde_json::from_value(json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
                "spec": {
                    "group": "monitoring.coreos.com",
                    "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
                    "scope": "Namespaced",
                    "versions": [{"name": "v1", "served": true, "storage": true,
                                  "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
                }
            }))
            .unwrap();
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            api.patch(&crd.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
                .await
                .expect("apply the ServiceMonitor CRD");
            tokio::time::timeout(WAIT, await_condition(api, &crd.name_any(), conditions::is_crd_established()))
                .await
                .expect("ServiceMonitor CRD established in time")
                .expect("watch the CRD");
        })
        .await;
}

async fn ensure_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
        .await
        .expect("apply a namespace");
}

/// Server-side applies each object (as `kubectl apply --server-side` would),
/// for real or as a dry run.
pub(crate) async fn apply_all(client: &Client, objects: &[Value], dry_run: bool) {
    for o in objects {
        let obj: DynamicObject = serde_json::from_value(o.clone()).expect("an object");
        let types = obj.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("a GVK");
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("the API server serves {gvk:?}: {e}"));
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                &obj.namespace()
                    .expect("namespaced objects name their namespace"),
                &resource,
            ),
        };
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.dry_run = dry_run;
        api.patch(&obj.name_any(), &params, &Patch::Apply(&obj))
            .await
            .unwrap_or_else(|e| panic!("{} {} refused: {e}", types.kind, obj.name_any()));
    }
}

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() {
    let client = testbed::kube().await;
    install_service_monitor_crd(&client).await;
    let release_ns = testbed::namespace(&client, "chart-dry-run").await;
    ensure_namespace(&client, "team-images").await;
    for (name, values) in variants() {
        let objects = render(&release_ns, &release_ns, &values);
        assert!(!objects.is_empty(), "{name}");
        apply_all(&client, &objects, true).await;
    }
}

/// Clients and the identity of the chart's ServiceAccount.
struct Identity {
    namespace: String,
    service_account: String,
}

impl Identity {
    fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// A client that impersonates the ServiceAccount with the groups the API
    /// server gives every ServiceAccount token.
    async fn client(&self) -> Client {
        let mut config = testbed::admin_config().await;
        config.auth_info.impersonate = Some(self.user());
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".into(),
        ]);
        Client::try_from(config).expect("an impersonating client")
    }

    async fn allowed(&self, admin: &Client, check: &Check) -> bool {
        let (group, resource) = check
            .resource
            .split_once('/')
            .unwrap_or(("", check.resource));
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_owned())),
            None => (resource, None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(self.user()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", self.namespace),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    verb: Some(check.verb.to_owned()),
                    namespace: Some(check.namespace.clone()),
                    name: check.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(admin.clone());
        api.create(&PostParams::default(), &review)
            .await
            .expect("create a SubjectAccessReview")
            .status
            .expect("a review status")
            .allowed
    }
}

/// One access check: `group/resource[/subresource]` (core group: a leading
/// `/`), a verb, a namespace ("" for cluster-wide) and an optional name.
struct Check {
    resource: &'static str,
    verb: &'static str,
    namespace: String,
    name: Option<String>,
    allowed: bool,
}

fn check(resource: &'static str, verb: &'static str, namespace: &str, allowed: bool) -> Check {
    Check {
        resource,
        verb,
        namespace: namespace.to_owned(),
        name: None,
        allowed,
    }
}

/// Renders the chart as release `namespace` in `namespace`, applies its
/// ServiceAccount and RBAC for real, and waits until the API server's RBAC
/// cache allows the first check that should be allowed.
async fn install_rbac(admin: &Client, namespace: &str, values: &Value) -> (Identity, Vec<Value>) {
    let objects: Vec<Value> = render(namespace, namespace, values)
        .into_iter()
        .filter(|o| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&o["kind"].as_str().unwrap())
        })
        .collect();
    apply_all(admin, &objects, false).await;
    let identity = Identity {
        namespace: namespace.to_owned(),
        service_account: one(&objects, "ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned(),
    };
    let watched = values["watchNamespace"].as_str().unwrap_or(namespace);
    let first = check("amicopy.dev/amicopies", "list", watched, true);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !identity.allowed(admin, &first).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chart's RBAC never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (identity, objects)
}

/// Removes the cluster-scoped objects a test applied (namespaces stay: the
/// test bed has no controller to empty them).
async fn remove_cluster_scoped(admin: &Client, objects: &[Value]) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    for o in objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        let dp = DeleteParams::default();
        match o["kind"].as_str().unwrap() {
            "ClusterRole" => drop(
                Api::<ClusterRole>::all(admin.clone())
                    .delete(name, &dp)
                    .await,
            ),
            "ClusterRoleBinding" => drop(
                Api::<ClusterRoleBinding>::all(admin.clone())
                    .delete(name, &dp)
                    .await,
            ),
            _ => {}
        }
    }
}

async fn assert_checks(admin: &Client, identity: &Identity, checks: &[Check]) {
    let mut wrong = Vec::new();
    for c in checks {
        let allowed = identity.allowed(admin, c).await;
        if allowed != c.allowed {
            wrong.push(format!(
                "{} {} in {:?} (name {:?}): allowed={allowed}, expected {}",
                c.verb, c.resource, c.namespace, c.name, c.allowed
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn access_reviews_cluster_wide_mode() {
    let admin = testbed::kube().await;
    let ns = testbed::namespace(&admin, "chart-sar").await;
    let (identity, objects) = install_rbac(&admin, &ns, &json!({})).await;
    let other = "some-other-namespace";
    let mut checks = vec![];
    for namespace in [ns.as_str(), other, ""] {
        for verb in ["get", "list", "watch", "patch"] {
            checks.push(check("amicopy.dev/amicopies", verb, namespace, true));
        }
        for verb in ["create", "update", "delete", "deletecollection"] {
            checks.push(check("amicopy.dev/amicopies", verb, namespace, false));
        }
        checks.push(check(
            "amicopy.dev/amicopies/status",
            "patch",
            namespace,
            true,
        ));
        checks.push(check(
            "amicopy.dev/amicopies/status",
            "update",
            namespace,
            false,
        ));
        checks.push(check("events.k8s.io/events", "create", namespace, true));
        checks.push(check("events.k8s.io/events", "patch", namespace, true));
        checks.push(check("events.k8s.io/events", "delete", namespace, false));
        checks.push(check("/events", "create", namespace, false));
        for resource in ["/secrets", "/pods", "/serviceaccounts"] {
            checks.push(check(resource, "get", namespace, false));
            checks.push(check(resource, "list", namespace, false));
        }
        // spec.publish.configMap: read one by name, write it by
        // server-side apply; never list or delete.
        for (verb, allowed) in [
            ("get", true),
            ("patch", true),
            ("list", false),
            ("delete", false),
        ] {
            checks.push(check("/configmaps", verb, namespace, allowed));
        }
        // Without leader election there is no Lease access at all.
        checks.push(check(
            "coordination.k8s.io/leases",
            "create",
            namespace,
            false,
        ));
        checks.push(check("coordination.k8s.io/leases", "get", namespace, false));
    }
    checks.push(check(
        "apiextensions.k8s.io/customresourcedefinitions",
        "get",
        "",
        false,
    ));
    checks.push(check(
        "rbac.authorization.k8s.io/clusterroles",
        "list",
        "",
        false,
    ));
    assert_checks(&admin, &identity, &checks).await;
    remove_cluster_scoped(&admin, &objects).await;
}

#[tokio::test]
async fn access_reviews_namespaced_mode_with_leader_election() {
    let admin = testbed::kube().await;
    let ns = testbed::namespace(&admin, "chart-sar-ns").await;
    let watched = testbed::namespace(&admin, "chart-sar-watched").await;
    let values = json!({"watchNamespace": watched, "replicas": 2});
    let (identity, _objects) = install_rbac(&admin, &ns, &values).await;
    let lease_name = format!("{ns}-ami-copy-operator");
    let lease_name = lease_name.as_str();
    let named = |mut c: Check, name: &str| {
        c.name = Some(name.to_owned());
        c
    };
    let mut checks = vec![];
    for verb in ["get", "list", "watch", "patch"] {
        checks.push(check("amicopy.dev/amicopies", verb, &watched, true));
        checks.push(check("amicopy.dev/amicopies", verb, &ns, false));
        checks.push(check("amicopy.dev/amicopies", verb, "", false));
    }
    checks.push(check("amicopy.dev/amicopies", "update", &watched, false));
    checks.push(check("amicopy.dev/amicopies", "delete", &watched, false));
    checks.push(check(
        "amicopy.dev/amicopies/status",
        "patch",
        &watched,
        true,
    ));
    checks.push(check("amicopy.dev/amicopies/status", "patch", &ns, false));
    checks.push(check("events.k8s.io/events", "create", &watched, true));
    checks.push(check("events.k8s.io/events", "create", "default", false));
    // Cluster-wide, it only reads the policies and the namespaces' labels.
    for verb in ["get", "list", "watch"] {
        checks.push(check("amicopy.dev/amicopypolicies", verb, "", true));
        checks.push(check("/namespaces", verb, "", true));
    }
    for verb in ["create", "patch", "delete"] {
        checks.push(check("amicopy.dev/amicopypolicies", verb, "", false));
        checks.push(check("/namespaces", verb, "", false));
    }
    checks.push(check("/secrets", "get", &watched, false));
    checks.push(check("/secrets", "list", &ns, false));
    checks.push(check("/configmaps", "list", &watched, false));
    checks.push(check("/configmaps", "patch", &watched, true));
    checks.push(check("/configmaps", "patch", &ns, false));
    // Leases: create in the release namespace; get and patch only its own.
    checks.push(check("coordination.k8s.io/leases", "create", &ns, true));
    for (verb, name, allowed) in [
        ("get", lease_name, true),
        ("patch", lease_name, true),
        ("update", lease_name, false),
        ("delete", lease_name, false),
        ("get", "kube-scheduler", false),
        ("patch", "kube-scheduler", false),
    ] {
        checks.push(named(
            check("coordination.k8s.io/leases", verb, &ns, allowed),
            name,
        ));
    }
    checks.push(check("coordination.k8s.io/leases", "list", &ns, false));
    checks.push(check(
        "coordination.k8s.io/leases",
        "create",
        &watched,
        false,
    ));
    checks.push(check(
        "coordination.k8s.io/leases",
        "create",
        "kube-system",
        false,
    ));
    assert_checks(&admin, &identity, &checks).await;
}

/// The operator, running as the chart's ServiceAccount (impersonated), copies
/// an AMI into two regions and cleans up on deletion: the chart's RBAC is
/// enough for everything the controller does.
async fn operator_cycle_as_the_charts_service_account(prefix: &str, namespaced: bool) {
    let admin = testbed::kube().await;
    let ns = testbed::namespace(&admin, prefix).await;
    let values = if namespaced {
        json!({"watchNamespace": ns})
    } else {
        json!({})
    };
    let (identity, objects) = install_rbac(&admin, &ns, &values).await;
    let client = identity.client().await;
    // The client really is the ServiceAccount, not the admin.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await;
    assert!(
        matches!(&secrets, Err(kube::Error::Api(e)) if e.code == 403),
        "listing Secrets must be forbidden: {secrets:?}"
    );

    let peer = Peer::sim().await;
    let operator = Operator::start(&client, &ns, peer.env.endpoint()).await;
    let setup = Setup {
        api: Api::namespaced(admin.clone(), &ns),
        kube: admin.clone(),
        peer,
        operator,
    };
    copy_two_regions_then_delete_with(setup, true).await;
    remove_cluster_scoped(&admin, &objects).await;
}

#[tokio::test]
async fn operator_as_the_charts_service_account_cluster_wide() {
    operator_cycle_as_the_charts_service_account("chart-operator", false).await;
}

#[tokio::test]
async fn operator_as_the_charts_service_account_namespaced() {
    operator_cycle_as_the_charts_service_account("chart-operator-ns", true).await;
}

/// Leader election as the chart's ServiceAccount: the Lease Role is enough to
/// create, acquire and release the Lease.
#[tokio::test]
async fn leader_election_as_the_charts_service_account() {
    let admin = testbed::kube().await;
    let ns = testbed::namespace(&admin, "chart-lease").await;
    let (identity, objects) = install_rbac(&admin, &ns, &json!({"replicas": 2})).await;
    let client = identity.client().await;
    let name = format!("{ns}-ami-copy-operator");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (led_tx, mut led_rx) = watch::channel(false);
    let config = LeaseConfig {
        namespace: ns.clone(),
        name: name.clone(),
        identity: "replica-a".into(),
        duration: Duration::from_secs(15),
    };
    let run = tokio::spawn(leader::run(client, config, stop_rx, move |lost| {
        let led = led_tx.clone();
        async move {
            let _ = led.send(true);
            lost.wait().await;
        }
    }));
    tokio::time::timeout(WAIT, led_rx.wait_for(|l| *l))
        .await
        .expect("leadership acquired in time")
        .expect("the leader task is alive");
    let lease = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get(&name)
        .await
        .expect("the Lease exists");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-a")
    );
    stop_tx.send(true).unwrap();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("leader election stops in time")
        .expect("the task did not panic")
        .expect("leader election ran without API errors");
    remove_cluster_scoped(&admin, &objects).await;
}

/// `argocd.installHealthCheck`: the hook's merge patch, sent as the Job's
/// ServiceAccount (impersonated: the test bed runs no pods), adds the health
/// check to an existing argocd-cm and keeps the rest; the Role allows that
/// one ConfigMap only.
#[tokio::test]
async fn the_argocd_health_check_hook_merges_the_script_into_argocd_cm() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let admin = testbed::kube().await;
    let release_ns = testbed::namespace(&admin, "chart-argocd-release").await;
    let argocd_ns = testbed::namespace(&admin, "chart-argocd").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &argocd_ns);
    for name in ["argocd-cm", "other"] {
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": name}, "data": {"url": "https://argocd.example"}}),
        )
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let values = json!({"argocd": {"installHealthCheck": true, "namespace": argocd_ns}});
    let objects = render(&release_ns, &release_ns, &values);
    let hook: Vec<Value> = objects
        .iter()
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-argocd-health")
        })
        .cloned()
        .collect();
    let kinds: BTreeSet<&str> = hook.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"])
    );
    let rbac: Vec<Value> = hook
        .iter()
        .filter(|o| o["kind"] != "Job" && o["kind"] != "ConfigMap")
        .cloned()
        .collect();
    apply_all(&admin, &rbac, false).await;
    // The Job and its ConfigMap, as the API server would take them.
    let job: Vec<Value> = hook
        .iter()
        .filter(|o| o["kind"] == "Job" || o["kind"] == "ConfigMap")
        .cloned()
        .collect();
    apply_all(&admin, &job, true).await;
    let patch: Value = serde_json::from_str(
        hook.iter().find(|o| o["kind"] == "ConfigMap").unwrap()["data"]["patch.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let sa = hook.iter().find(|o| o["kind"] == "ServiceAccount").unwrap();
    let identity = Identity {
        namespace: release_ns.clone(),
        service_account: sa["metadata"]["name"].as_str().unwrap().to_owned(),
    };
    let as_job: Api<ConfigMap> = Api::namespaced(identity.client().await, &argocd_ns);
    let deadline = tokio::time::Instant::now() + WAIT;
    let merged = loop {
        match as_job
            .patch("argocd-cm", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(cm) => break cm,
            // The API server's RBAC cache takes a moment.
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the hook's patch: {e}"),
        }
    };
    let data = merged.data.unwrap();
    assert_eq!(data["url"], "https://argocd.example", "the rest is kept");
    assert_eq!(
        data["resource.customizations.health.amicopy.dev_AmiCopy"],
        include_str!(
            "../../charts/ami-copy-operator/argocd/resource_customizations/amicopy.dev/AmiCopy/health.lua"
        )
    );
    match as_job
        .patch("other", &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403),
        other => panic!("another ConfigMap was patched: {other:?}"),
    }
}
