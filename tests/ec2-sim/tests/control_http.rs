//! The JSON control API under `/_sim/`, driven over plain HTTP.

use std::time::Duration;

use ec2_sim::{SimConfig, Simulator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 exchange; returns the status and the body.
async fn call(sim: &Simulator, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let mut stream = TcpStream::connect(sim.addr()).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn json(sim: &Simulator, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, body) = call(sim, method, path, body).await;
    assert_eq!(status, 200, "{method} {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn control_api_mirrors_the_rust_one() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();

    let seeded = json(
        &sim,
        "POST",
        "/_sim/images",
        Some(json!({"region": "us-east-1", "name": "from-http", "encrypted": true})),
    )
    .await;
    let id = seeded["image_id"].as_str().unwrap().to_string();
    let image = sim.image(&id).expect("seeded over HTTP, visible from Rust");
    assert!(image.block_devices[0].ebs.as_ref().unwrap().encrypted);
    let images = json(&sim, "GET", "/_sim/images", None).await;
    assert_eq!(images[0]["id"], id.as_str());
    assert_eq!(
        json(&sim, "GET", "/_sim/snapshots", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let config = json(
        &sim,
        "PATCH",
        "/_sim/config",
        Some(json!({"copy_duration": 5000, "concurrent_copy_limit": 3})),
    )
    .await;
    assert_eq!(config["copy_duration"], 5000);
    assert_eq!(sim.config().copy_duration, Duration::from_secs(5));
    assert_eq!(sim.config().concurrent_copy_limit, 3);
    let (status, _) = call(
        &sim,
        "PATCH",
        "/_sim/config",
        Some(json!({"copy_duration": "x"})),
    )
    .await;
    assert_eq!(status, 400);

    let (status, _) = call(
        &sim,
        "POST",
        "/_sim/encryption-by-default",
        Some(json!({"region": "eu-west-1", "enabled": true})),
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        sim.config()
            .encrypts_by_default("123456789012", "eu-west-1")
    );

    let rule = json!({"kind": "throttle", "when": "next", "count": 3, "region": "eu-west-1"});
    let (status, _) = call(&sim, "POST", "/_sim/faults", Some(rule)).await;
    assert_eq!(status, 204);
    assert_eq!(sim.faults().len(), 1);
    assert_eq!(json(&sim, "GET", "/_sim/faults", None).await[0]["count"], 3);
    let (status, _) = call(&sim, "DELETE", "/_sim/faults", None).await;
    assert_eq!(status, 204);
    assert!(sim.faults().is_empty());

    let (status, _) = call(&sim, "POST", "/_sim/advance", Some(json!({"ms": 1000}))).await;
    assert_eq!(status, 204);
    let (status, _) = call(&sim, "POST", "/_sim/finish-copies", None).await;
    assert_eq!(status, 204);

    // An unsigned EC2 call is refused, and counted.
    let (status, body) = call(&sim, "POST", "/", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("MissingAuthenticationToken"));
    let stats = json(&sim, "GET", "/_sim/stats", None).await;
    assert_eq!(stats[0]["outcome"], "MissingAuthenticationToken");

    let (status, _) = call(&sim, "POST", "/_sim/reset", None).await;
    assert_eq!(status, 204);
    assert!(sim.images().is_empty());
    assert!(sim.calls().is_empty());
    assert_eq!(
        sim.config().concurrent_copy_limit,
        3,
        "reset keeps the config"
    );
}
