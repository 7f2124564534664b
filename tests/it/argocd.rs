//! The Argo CD health check (`charts/ami-copy-operator/argocd/resource_customizations/amicopy.dev/AmiCopy/health.lua`)
//! run by a real Lua interpreter against sample AmiCopies, the way Argo CD
//! runs it: `obj` is a global table holding the live object.

use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaSerdeExt, Table};
use serde_json::{Value, json};

const SCRIPT: &str = include_str!(
    "../../charts/ami-copy-operator/argocd/resource_customizations/amicopy.dev/AmiCopy/health.lua"
);

/// (status, message) the script returns for `obj`.
fn health(obj: &Value) -> (String, String) {
    let lua = Lua::new();
    // JSON null must be Lua nil, as in Argo CD, not a null sentinel.
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let value = lua.to_value_with(obj, options).expect("obj as a Lua value");
    lua.globals().set("obj", value).expect("set obj");
    let hs: Table = lua
        .load(SCRIPT)
        .set_name("health.lua")
        .eval()
        .expect("the script runs");
    (
        hs.get("status").expect("status"),
        hs.get("message").expect("message"),
    )
}

fn amicopy(generation: i64, status: Value) -> Value {
    json!({
        "apiVersion": "amicopy.dev/v1alpha1",
        "kind": "AmiCopy",
        "metadata": {"name": "golden", "namespace": "images", "generation": generation},
        "spec": {"source": {"region": "us-east-1", "imageId": "ami-0123456789abcdef0"},
                 "destinations": [{"region": "eu-west-1"}]},
        "status": status,
    })
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

#[test]
fn health_check_samples() {
    let ready = |generation: i64, observed: i64| {
        amicopy(
            generation,
            json!({"observedGeneration": observed, "available": "1/1", "conditions": [
                condition("Ready", "True", "Available", "every copy is available"),
                condition("Progressing", "False", "Available", ""),
                condition("Degraded", "False", "Available", ""),
            ]}),
        )
    };
    let cases = [
        ("healthy", ready(2, 2), "Healthy", "every copy is available"),
        (
            "stale generation",
            ready(3, 2),
            "Progressing",
            "Waiting for the operator to observe generation 3",
        ),
        (
            "degraded",
            amicopy(
                1,
                json!({"observedGeneration": 1, "conditions": [
                    condition("Ready", "False", "CopyFailed", "1 of 2 copies failed"),
                    condition("Progressing", "False", "CopyFailed", ""),
                    condition("Degraded", "True", "CopyFailed", "ap-southeast-2: snapshot copy failed"),
                ]}),
            ),
            "Degraded",
            "ap-southeast-2: snapshot copy failed",
        ),
        (
            "degraded without a message shows the reason",
            amicopy(
                1,
                json!({"observedGeneration": 1, "conditions": [
                    json!({"type": "Degraded", "status": "True", "reason": "AccessDenied"}),
                ]}),
            ),
            "Degraded",
            "AccessDenied",
        ),
        (
            "progressing",
            amicopy(
                1,
                json!({"observedGeneration": 1, "conditions": [
                    condition("Ready", "False", "CopyPending", "0/1 available"),
                    condition("Progressing", "True", "CopyPending", "copying to eu-west-1"),
                    condition("Degraded", "False", "CopyPending", ""),
                ]}),
            ),
            "Progressing",
            "copying to eu-west-1",
        ),
        (
            "not ready, not progressing: the Ready message",
            amicopy(
                1,
                json!({"observedGeneration": 1, "conditions": [
                    condition("Ready", "False", "Waiting", "waiting for the source to be available"),
                ]}),
            ),
            "Progressing",
            "waiting for the source to be available",
        ),
        (
            "no status",
            {
                let mut o = amicopy(1, Value::Null);
                o.as_object_mut().unwrap().remove("status");
                o
            },
            "Progressing",
            "Waiting for status",
        ),
        (
            "null status",
            amicopy(1, Value::Null),
            "Progressing",
            "Waiting for status",
        ),
        (
            "status without conditions",
            amicopy(1, json!({"observedGeneration": 1, "conditions": []})),
            "Progressing",
            "Waiting for status",
        ),
    ];
    for (name, obj, status, message) in cases {
        assert_eq!(
            health(&obj),
            (status.to_owned(), message.to_owned()),
            "{name}"
        );
    }
}

/// Argo CD's own way: gopher-lua (built from its Go module by
/// `hack/testbed/build.sh argocd-health`) runs `health.lua` over the objects
/// under `testdata/`, which the operator produced against the test bed, and
/// checks each against `health_test.yaml`, in the layout of Argo CD's
/// `resource_customizations/`.
#[test]
fn gopher_lua_runs_the_health_check_over_objects_the_operator_produced() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/ami-copy-operator/argocd/resource_customizations/amicopy.dev/AmiCopy"
    );
    let out = std::process::Command::new(runner())
        .arg(dir)
        .output()
        .expect("run the health check runner");
    let text = String::from_utf8(out.stdout).unwrap();
    eprint!("{text}");
    assert!(
        out.status.success(),
        "health_test.yaml not met: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<(&str, &str)> = text
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("testdata/copying.yaml", "Progressing"),
            ("testdata/duplicate-name.yaml", "Degraded"),
            ("testdata/ready.yaml", "Healthy"),
            ("testdata/source-not-found.yaml", "Degraded"),
            ("testdata/spec-changed.yaml", "Progressing"),
        ]
    );
}

fn runner() -> std::path::PathBuf {
    crate::testbed::testbed_program(
        "AMICOPY_ARGOCD_HEALTH",
        "GOPHER_LUA_VERSION",
        "argocd-health",
        "argocd-health",
    )
}
