//! The JSON control API under `/_sim/`, driven over plain HTTP, and EC2
//! behaviour as it shows on the wire: what the knobs switch on, and the
//! documents of the actions whose XML the SDK parses by element name.

use std::time::Duration;

use ec2_sim::{SeedImage, SimConfig, Simulator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 exchange; returns the status and the body, or `None` when
/// the server closed the connection without answering.
async fn exchange(
    sim: &Simulator,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(sim.addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// One control API exchange with a JSON body.
async fn call(sim: &Simulator, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let json = "Content-Type: application/json\r\n";
    exchange(sim, method, path, json, &body)
        .await
        .expect("the control API answers")
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

/// A Query API request in us-east-1 to `service` (`ec2` or `sts`), signed
/// with a key the simulator does not verify.
async fn query(sim: &Simulator, service: &str, params: &[(&str, &str)]) -> Option<(u16, String)> {
    let headers = format!(
        "Authorization: AWS4-HMAC-SHA256 \
         Credential=AKIDSIMTEST/20250101/us-east-1/{service}/aws4_request, \
         SignedHeaders=host, Signature={}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n",
        "0".repeat(64)
    );
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    exchange(sim, "POST", "/", &headers, &body).await
}

/// An EC2 call that gets an answer.
async fn ec2(sim: &Simulator, params: &[(&str, &str)]) -> (u16, String) {
    query(sim, "ec2", params).await.expect("an answer")
}

/// The text of the first `<name>` element of an XML answer.
fn field<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let rest = &xml[xml.find(&open)? + open.len()..];
    Some(&rest[..rest.find('<')?])
}

/// The outcomes the call stats hold for `action`.
fn outcomes(sim: &Simulator, action: &str) -> Vec<String> {
    sim.calls()
        .into_iter()
        .filter(|c| c.action == action)
        .map(|c| c.outcome)
        .collect()
}

/// Adds a rule striking the next `action` after it was applied.
async fn after_next(sim: &Simulator, action: &str, mut kind: Value) {
    kind.as_object_mut().unwrap().extend([
        ("when".to_string(), json!("next")),
        ("count".to_string(), json!(1)),
        ("action".to_string(), json!(action)),
        ("phase".to_string(), json!("after")),
    ]);
    let (status, body) = call(sim, "POST", "/_sim/faults", Some(kind)).await;
    assert_eq!(status, 204, "{body}");
}

#[tokio::test]
async fn faults_after_the_action_lose_the_reply_of_an_applied_call() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let source = sim.seed_image(SeedImage::new("us-east-1", "base"));

    after_next(&sim, "CopyImage", json!({"kind": "drop_connection"})).await;
    let copy_request = [
        ("Action", "CopyImage"),
        ("SourceRegion", "us-east-1"),
        ("SourceImageId", source.as_str()),
        ("Name", "lost-reply"),
    ];
    assert_eq!(query(&sim, "ec2", &copy_request).await, None);
    let copy = sim
        .images()
        .into_iter()
        .find(|i| i.name == "lost-reply")
        .expect("the copy started all the same");
    assert_eq!(copy.source.as_ref().unwrap().image_id, source);
    sim.finish_copies();
    let snapshot = sim.image(&copy.id).unwrap().block_devices[0]
        .ebs
        .as_ref()
        .unwrap()
        .snapshot_id
        .clone()
        .unwrap();

    after_next(&sim, "CreateTags", json!({"kind": "internal_error"})).await;
    let id = copy.id.as_str();
    let tag = |id| {
        [
            ("Action", "CreateTags"),
            ("ResourceId.1", id),
            ("Tag.1.Key", "team"),
            ("Tag.1.Value", "a"),
        ]
    };
    let (status, _) = ec2(&sim, &tag("ami-0000000000000000f")).await;
    assert_eq!(status, 400, "a call that fails is not one the rule strikes");
    let (status, body) = ec2(&sim, &tag(id)).await;
    assert_eq!((status, field(&body, "Code")), (500, Some("InternalError")));
    assert_eq!(sim.image(id).unwrap().tags["team"], "a");

    after_next(&sim, "DeleteTags", json!({"kind": "unavailable"})).await;
    let untag = [
        ("Action", "DeleteTags"),
        ("ResourceId.1", id),
        ("Tag.1.Key", "team"),
    ];
    assert_eq!(ec2(&sim, &untag).await.0, 503);
    assert!(sim.image(id).unwrap().tags.is_empty());

    after_next(&sim, "ModifyImageAttribute", json!({"kind": "throttle"})).await;
    let describe = [
        ("Action", "ModifyImageAttribute"),
        ("ImageId", id),
        ("Description.Value", "new"),
    ];
    assert_eq!(ec2(&sim, &describe).await.0, 503);
    assert_eq!(sim.image(id).unwrap().description.as_deref(), Some("new"));

    after_next(
        &sim,
        "ModifySnapshotAttribute",
        json!({"kind": "internal_error"}),
    )
    .await;
    let share = [
        ("Action", "ModifySnapshotAttribute"),
        ("SnapshotId", snapshot.as_str()),
        ("Attribute", "createVolumePermission"),
        ("OperationType", "add"),
        ("UserId.1", "210987654321"),
    ];
    assert_eq!(ec2(&sim, &share).await.0, 500);
    assert_eq!(
        sim.snapshot(&snapshot)
            .unwrap()
            .create_volume_permissions
            .len(),
        1
    );

    // A reply held back longer than the client waits: the client gives up,
    // EC2 deregistered the image all the same.
    after_next(
        &sim,
        "DeregisterImage",
        json!({"kind": "latency", "delay": 800}),
    )
    .await;
    let deregister = [("Action", "DeregisterImage"), ("ImageId", id)];
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), query(&sim, "ec2", &deregister)).await;
    assert!(gave_up.is_err());
    assert!(sim.image(id).is_none());

    after_next(&sim, "DeleteSnapshot", json!({"kind": "drop_connection"})).await;
    let delete = [
        ("Action", "DeleteSnapshot"),
        ("SnapshotId", snapshot.as_str()),
    ];
    assert_eq!(query(&sim, "ec2", &delete).await, None);
    assert!(sim.snapshot(&snapshot).is_none());

    let expected = [
        ("CopyImage", "applied:dropped"),
        ("ModifyImageAttribute", "applied:RequestLimitExceeded"),
        ("ModifySnapshotAttribute", "applied:InternalError"),
        ("DeleteTags", "applied:Unavailable"),
        ("DeregisterImage", "applied:delayed"),
        ("DeleteSnapshot", "applied:dropped"),
    ];
    for (action, outcome) in expected {
        assert_eq!(outcomes(&sim, action), [outcome], "{action}");
    }
    let mut tagged = outcomes(&sim, "CreateTags");
    tagged.sort();
    assert_eq!(tagged, ["InvalidAMIID.NotFound", "applied:InternalError"]);
}

#[tokio::test]
async fn credential_faults_answer_as_ec2_does() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    for kind in ["auth_failure", "expired_credentials"] {
        let rule = json!({"kind": kind, "when": "next", "count": 1});
        assert_eq!(call(&sim, "POST", "/_sim/faults", Some(rule)).await.0, 204);
    }
    let describe = [("Action", "DescribeImages"), ("Owner.1", "self")];
    let (status, body) = ec2(&sim, &describe).await;
    assert_eq!((status, field(&body, "Code")), (401, Some("AuthFailure")));
    assert_eq!(
        field(&body, "Message"),
        Some("AWS was not able to validate the provided access credentials")
    );
    let (status, body) = ec2(&sim, &describe).await;
    assert_eq!(
        (status, field(&body, "Code")),
        (400, Some("RequestExpired"))
    );
    assert_eq!(ec2(&sim, &describe).await.0, 200);
    let mut seen = outcomes(&sim, "DescribeImages");
    seen.sort();
    assert_eq!(seen, ["AuthFailure", "RequestExpired", "ok"]);
}

#[tokio::test]
async fn roles_are_granted_and_revoked_through_the_config() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let role = "arn:aws:iam::210987654321:role/copier";
    let assume = [
        ("Action", "AssumeRole"),
        ("Version", "2011-06-15"),
        ("RoleArn", role),
        ("RoleSessionName", "operator"),
    ];
    let grant = json!({"roles": {role: null}});
    assert_eq!(
        call(&sim, "PATCH", "/_sim/config", Some(grant)).await.0,
        200
    );
    let (status, body) = query(&sim, "sts", &assume).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let key = field(&body, "AccessKeyId").unwrap();
    assert_eq!(sim.config().identity(key).account, "210987654321");

    let revoke = json!({"roles": {}});
    assert_eq!(
        call(&sim, "PATCH", "/_sim/config", Some(revoke)).await.0,
        200
    );
    let (status, body) = query(&sim, "sts", &assume).await.unwrap();
    assert_eq!((status, field(&body, "Code")), (403, Some("AccessDenied")));
}

#[tokio::test]
async fn eventual_consistency_shows_on_the_wire() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let lag = json!({"propagation_lag": 5000, "deregistered_visibility": 5000});
    let config = json(&sim, "PATCH", "/_sim/config", Some(lag)).await;
    assert_eq!(config["propagation_lag"], 5000);
    assert_eq!(sim.config().deregistered_visibility, Duration::from_secs(5));
    let advance = || call(&sim, "POST", "/_sim/advance", Some(json!({"ms": 5000})));
    let source = sim.seed_image(SeedImage::new("us-east-1", "base"));

    let (status, body) = ec2(
        &sim,
        &[
            ("Action", "CopyImage"),
            ("SourceRegion", "us-east-1"),
            ("SourceImageId", source.as_str()),
            ("Name", "fresh"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = field(&body, "imageId").unwrap().to_string();
    let by_id = [("Action", "DescribeImages"), ("ImageId.1", id.as_str())];
    let (status, body) = ec2(&sim, &by_id).await;
    assert_eq!(
        (status, field(&body, "Code")),
        (400, Some("InvalidAMIID.NotFound"))
    );
    advance().await;
    let (status, body) = ec2(&sim, &by_id).await;
    assert_eq!((status, field(&body, "imageId")), (200, Some(id.as_str())));

    let tag = [
        ("Action", "CreateTags"),
        ("ResourceId.1", id.as_str()),
        ("Tag.1.Key", "owner"),
        ("Tag.1.Value", "x"),
    ];
    assert_eq!(ec2(&sim, &tag).await.0, 200);
    let by_tag = [
        ("Action", "DescribeImages"),
        ("Filter.1.Name", "tag:owner"),
        ("Filter.1.Value.1", "x"),
    ];
    assert_eq!(field(&ec2(&sim, &by_tag).await.1, "imageId"), None);
    advance().await;
    assert_eq!(
        field(&ec2(&sim, &by_tag).await.1, "imageId"),
        Some(id.as_str())
    );

    let deregister = [("Action", "DeregisterImage"), ("ImageId", id.as_str())];
    assert_eq!(ec2(&sim, &deregister).await.0, 200);
    let (_, body) = ec2(&sim, &by_id).await;
    assert_eq!(field(&body, "imageState"), Some("deregistered"));
    advance().await;
    let (status, body) = ec2(&sim, &by_id).await;
    assert_eq!((status, field(&body, "imageId")), (200, None), "{body}");
}

/// How many times `<name>` opens in `xml`.
fn count(xml: &str, name: &str) -> usize {
    xml.matches(&format!("<{name}>")).count()
}

#[tokio::test]
async fn launch_templates_and_instances_show_on_the_wire() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let a = sim.seed_image(SeedImage::new("us-east-1", "image-a"));
    let b = sim.seed_image(SeedImage::new("us-east-1", "image-b"));

    let (status, body) = ec2(
        &sim,
        &[
            ("Action", "CreateLaunchTemplate"),
            ("LaunchTemplateName", "web"),
            ("VersionDescription", "first"),
            ("LaunchTemplateData.ImageId", a.as_str()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<launchTemplate><launchTemplateId>lt-"),
        "{body}"
    );
    let web = field(&body, "launchTemplateId").unwrap().to_string();
    assert_eq!(web.len(), 20);
    assert_eq!(field(&body, "defaultVersionNumber"), Some("1"));
    assert_eq!(field(&body, "latestVersionNumber"), Some("1"));
    let (status, body) = ec2(
        &sim,
        &[
            ("Action", "CreateLaunchTemplateVersion"),
            ("LaunchTemplateId", web.as_str()),
            ("LaunchTemplateData.ImageId", b.as_str()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<launchTemplateVersion><launchTemplateId>"));
    assert_eq!(field(&body, "versionNumber"), Some("2"));
    assert_eq!(field(&body, "defaultVersion"), Some("false"));

    // What the operator asks: the latest and default versions of every
    // template, by image, a page at a time.
    let mut describe = vec![
        ("Action", "DescribeLaunchTemplateVersions"),
        ("LaunchTemplateVersion.1", "$Latest"),
        ("LaunchTemplateVersion.2", "$Default"),
        ("Filter.1.Name", "image-id"),
        ("Filter.1.Value.1", a.as_str()),
        ("Filter.1.Value.2", b.as_str()),
        ("MaxResults", "1"),
    ];
    let (status, body) = ec2(&sim, &describe).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!(
            "<launchTemplateVersionSet><item><launchTemplateId>{web}</launchTemplateId>\
             <launchTemplateName>web</launchTemplateName><versionNumber>1</versionNumber>\
             <versionDescription>first</versionDescription><createTime>"
        )),
        "{body}"
    );
    assert!(body.contains(&format!(
        "<defaultVersion>true</defaultVersion><launchTemplateData><imageId>{a}</imageId></launchTemplateData></item></launchTemplateVersionSet>"
    )));
    let token = field(&body, "nextToken").unwrap().to_string();
    describe.push(("NextToken", token.as_str()));
    let (_, body) = ec2(&sim, &describe).await;
    assert_eq!(count(&body, "item"), 1, "{body}");
    assert_eq!(field(&body, "versionNumber"), Some("2"));
    assert_eq!(field(&body, "imageId"), Some(b.as_str()));
    assert_eq!(field(&body, "nextToken"), None);

    let (status, body) = ec2(
        &sim,
        &[
            ("Action", "RunInstances"),
            ("ImageId", a.as_str()),
            ("MinCount", "1"),
            ("MaxCount", "2"),
            ("InstanceType", "t3.micro"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<reservationId>r-"), "{body}");
    assert!(body.contains("<instancesSet><item><instanceId>i-"));
    assert_eq!(count(&body, "instanceId"), 2);
    let first = field(&body, "instanceId").unwrap().to_string();
    let stop = [
        ("Action", "StopInstances"),
        ("InstanceId.1", first.as_str()),
    ];
    let (status, body) = ec2(&sim, &stop).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(
        "<currentState><code>80</code><name>stopped</name></currentState>\
         <previousState><code>16</code><name>running</name></previousState>"
    ));

    let (status, body) = ec2(
        &sim,
        &[
            ("Action", "DescribeInstances"),
            ("Filter.1.Name", "image-id"),
            ("Filter.1.Value.1", a.as_str()),
            ("Filter.1.Value.2", b.as_str()),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "running"),
            ("Filter.2.Value.2", "pending"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<reservationSet><item><reservationId>r-"),
        "{body}"
    );
    assert!(body.contains(
        "<ownerId>123456789012</ownerId><groupSet></groupSet><instancesSet><item><instanceId>i-"
    ));
    assert_eq!(count(&body, "instanceId"), 1, "the stopped one is left out");
    assert_ne!(field(&body, "instanceId"), Some(first.as_str()));
    assert!(body.contains(&format!(
        "<imageId>{a}</imageId><instanceState><code>16</code><name>running</name></instanceState>\
         <instanceType>t3.micro</instanceType><launchTime>"
    )));

    // The image shows its use, and its protection.
    let protect = [
        ("Action", "EnableImageDeregistrationProtection"),
        ("ImageId", a.as_str()),
        ("WithCooldown", "true"),
    ];
    let (status, body) = ec2(&sim, &protect).await;
    assert_eq!((status, field(&body, "return")), (200, Some("true")));
    let by_id = [("Action", "DescribeImages"), ("ImageId.1", a.as_str())];
    let (_, body) = ec2(&sim, &by_id).await;
    assert_eq!(
        field(&body, "deregistrationProtection"),
        Some("enabled-with-cooldown")
    );
    let launched = field(&body, "lastLaunchedTime").expect("launched from");
    assert!(
        launched.ends_with('Z') && launched.len() == 24,
        "{launched}"
    );
    let deregister = [("Action", "DeregisterImage"), ("ImageId", a.as_str())];
    let (status, body) = ec2(&sim, &deregister).await;
    assert_eq!(
        (status, field(&body, "Code")),
        (400, Some("OperationNotPermitted"))
    );
    let unprotect = [
        ("Action", "DisableImageDeregistrationProtection"),
        ("ImageId", a.as_str()),
    ];
    assert_eq!(ec2(&sim, &unprotect).await.0, 200);
    let (_, body) = ec2(&sim, &by_id).await;
    let protection = field(&body, "deregistrationProtection").unwrap();
    assert!(protection.starts_with("disabled-until 20"), "{protection}");
    sim.advance(Duration::from_secs(24 * 3600));
    let (_, body) = ec2(&sim, &by_id).await;
    assert_eq!(field(&body, "deregistrationProtection"), Some("disabled"));
    assert_eq!(ec2(&sim, &deregister).await.0, 200);

    // Counted, and open to faults, like every other action.
    assert_eq!(
        sim.call_count("DescribeLaunchTemplateVersions", "us-east-1"),
        2
    );
    assert_eq!(outcomes(&sim, "DeregisterImage").len(), 2);
    let rule =
        json!({"kind": "throttle", "when": "next", "count": 1, "action": "DescribeInstances"});
    assert_eq!(call(&sim, "POST", "/_sim/faults", Some(rule)).await.0, 204);
    let (status, body) = ec2(&sim, &[("Action", "DescribeInstances")]).await;
    assert_eq!(
        (status, field(&body, "Code")),
        (503, Some("RequestLimitExceeded"))
    );
    assert_eq!(
        count(
            &ec2(&sim, &[("Action", "DescribeInstances")]).await.1,
            "instanceId"
        ),
        2
    );
    let instances = json(&sim, "GET", "/_sim/instances", None).await;
    assert_eq!(instances.as_array().unwrap().len(), 2);
    let templates = json(&sim, "GET", "/_sim/launch-templates", None).await;
    assert_eq!(templates[0]["id"], web.as_str());
    assert_eq!(sim.launch_templates()[0].latest_version(), 2);
}

#[tokio::test]
async fn disabled_images_show_only_when_asked_for() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let id = sim.seed_image(SeedImage::new("us-east-1", "retired"));
    let disable = [("Action", "DisableImage"), ("ImageId", id.as_str())];
    let (status, body) = ec2(&sim, &disable).await;
    assert_eq!((status, field(&body, "return")), (200, Some("true")));
    let (status, body) = ec2(&sim, &disable).await;
    assert_eq!(
        (status, field(&body, "Code")),
        (400, Some("IncorrectState"))
    );

    let mut by_id = vec![("Action", "DescribeImages"), ("ImageId.1", id.as_str())];
    let (status, body) = ec2(&sim, &by_id).await;
    assert_eq!((status, field(&body, "imageId")), (200, None), "{body}");
    by_id.push(("IncludeDisabled", "true"));
    let (_, body) = ec2(&sim, &by_id).await;
    assert_eq!(field(&body, "imageState"), Some("disabled"));

    let enable = [("Action", "EnableImage"), ("ImageId", id.as_str())];
    assert_eq!(ec2(&sim, &enable).await.0, 200);
    let (_, body) = ec2(&sim, &by_id[..2]).await;
    assert_eq!(field(&body, "imageState"), Some("available"));
}
