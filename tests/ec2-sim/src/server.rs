//! HTTP: the EC2 endpoint at `/` and the JSON control API under `/_sim/`.

use std::io;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use serde_json::Value;

use crate::config::{Identity, SimConfig};
use crate::control::Control;
use crate::faults::{FaultRule, Verdict};
use crate::model::{Caller, SeedImage};
use crate::sigv4::Authorization;
use crate::wire::{API_VERSION, ApiError, Params};

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/", post(ec2))
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .route("/_sim/config", get(get_config).patch(patch_config))
        .route(
            "/_sim/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_sim/images", get(list_images).post(seed_image))
        .route("/_sim/snapshots", get(list_snapshots))
        .route("/_sim/launch-templates", get(list_launch_templates))
        .route("/_sim/instances", get(list_instances))
        .route("/_sim/advance", post(advance))
        .route("/_sim/finish-copies", post(finish_copies))
        .route("/_sim/encryption-by-default", post(encryption_by_default))
        .with_state(control)
}

fn request_id() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn xml(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        body,
    )
        .into_response()
}

/// A response whose body fails before a byte is written, so the server
/// closes the connection without answering.
fn dropped() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(failing))
}

/// Authenticates a request: its region, account and parameters.
fn authenticate(
    control: &Control,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Caller, Params, String), (ApiError, Option<String>)> {
    let params = Params::parse(body);
    let auth = Authorization::parse(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .map_err(|e| (e, None))?;
    let config = control.config();
    let region = Some(auth.region.clone());
    if !config.is_region(&auth.region) {
        return Err((
            ApiError::with_status(
                401,
                "AuthFailure",
                format!(
                    "AWS was not able to validate the provided access credentials: region '{}' is not enabled",
                    auth.region
                ),
            ),
            region,
        ));
    }
    let identity = config.identity(&auth.access_key_id);
    if let Some(secret) = &identity.secret_access_key {
        let header_value = |name: &str| Some(headers.get(name)?.to_str().ok()?.trim().to_string());
        auth.verify(secret, header_value, body)
            .map_err(|e| (e, region.clone()))?;
    }
    if let Some(version) = params.get("Version")
        && version != API_VERSION
        && auth.service == "ec2"
    {
        return Err((
            ApiError::client(
                "InvalidParameterValue",
                format!("Unsupported API version {version}"),
            ),
            region,
        ));
    }
    Ok((
        Caller {
            account: identity.account,
            region: auth.region,
        },
        params,
        auth.service,
    ))
}

async fn ec2(State(control): State<Arc<Control>>, headers: HeaderMap, body: Bytes) -> Response {
    let request_id = request_id();
    let action = Params::parse(&body)
        .string("Action")
        .unwrap_or_else(|| "-".to_string());
    let fail = |error: ApiError, region: &str| {
        control.record(&action, region, &error.code);
        xml(error.status, error.to_xml(&request_id))
    };
    let (caller, params, service) = match authenticate(&control, &headers, &body) {
        Ok(ok) => ok,
        Err((error, region)) => return fail(error, region.as_deref().unwrap_or("-")),
    };
    if service == "sts" && action == "GetCallerIdentity" {
        control.record(&action, &caller.region, "ok");
        return xml(200, caller_identity(&caller.account, &request_id));
    }
    if service == "sts" {
        return match assume_role(&control, &action, &params, &request_id) {
            Ok(body) => {
                control.record(&action, &caller.region, "ok");
                xml(200, body)
            }
            Err(error) => fail(error, &caller.region),
        };
    }
    if action == "-" {
        return fail(
            ApiError::client(
                "MissingAction",
                "The request must contain the parameter Action",
            ),
            &caller.region,
        );
    }
    let region = caller.region.as_str();
    let call = Exchange {
        control: &control,
        action: &action,
        region,
        request_id: &request_id,
    };
    if let Some(failed) = call.before(control.judge(&action, region)).await {
        return failed;
    }
    match control.execute(&action, &caller, &params, &request_id) {
        Ok(body) => {
            call.after(control.judge_after(&action, region), xml(200, body))
                .await
        }
        Err(error) => fail(error, region),
    }
}

/// One EC2 call being answered, as the call stats count it.
struct Exchange<'a> {
    control: &'a Control,
    action: &'a str,
    region: &'a str,
    request_id: &'a str,
}

impl Exchange<'_> {
    fn record(&self, outcome: &str) {
        self.control.record(self.action, self.region, outcome);
    }

    /// The failure a verdict injects, if any: what the call stats call it,
    /// and the response.
    fn injected(&self, verdict: &Verdict) -> Option<(String, Response)> {
        let failure = match verdict.outcome?.error() {
            None => ("dropped".to_string(), dropped()),
            Some(error) => {
                let response = xml(error.status, error.to_xml(self.request_id));
                (error.code, response)
            }
        };
        Some(failure)
    }

    /// Before the action: waits out the verdict's delay, then fails the
    /// call if the verdict says so. `None` when the call goes on.
    async fn before(&self, verdict: Verdict) -> Option<Response> {
        if !verdict.delay.is_zero() {
            tokio::time::sleep(verdict.delay).await;
        }
        let (outcome, response) = self.injected(&verdict)?;
        self.record(&outcome);
        Some(response)
    }

    /// After the action was applied: `reply`, unless the verdict loses it
    /// or holds it back. A lost reply is counted as `applied:` and what the
    /// client got instead, and counted at once: a client that gives up
    /// waiting closes the connection, and with it this future.
    async fn after(&self, verdict: Verdict, reply: Response) -> Response {
        let (outcome, response) = match self.injected(&verdict) {
            Some((what, lost)) => (format!("applied:{what}"), lost),
            None if !verdict.delay.is_zero() => ("applied:delayed".to_string(), reply),
            None => ("ok".to_string(), reply),
        };
        self.record(&outcome);
        if !verdict.delay.is_zero() {
            tokio::time::sleep(verdict.delay).await;
        }
        response
    }
}

/// STS GetCallerIdentity: the account of the credentials that signed the
/// request ("GetCallerIdentity", AWS STS API Reference).
fn caller_identity(account: &str, request_id: &str) -> String {
    format!(
        "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><GetCallerIdentityResult>\
         <Arn>arn:aws:iam::{account}:user/sim</Arn><UserId>AIDASIM</UserId><Account>{account}</Account>\
         </GetCallerIdentityResult><ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></GetCallerIdentityResponse>"
    )
}

/// STS AssumeRole for the roles the configuration lists: fresh credentials
/// of the role's account, known to the simulator from then on.
fn assume_role(
    control: &Control,
    action: &str,
    params: &Params,
    request_id: &str,
) -> Result<String, ApiError> {
    let denied = |why: String| ApiError::with_status(403, "AccessDenied", why);
    if action != "AssumeRole" {
        return Err(ApiError::client(
            "InvalidAction",
            format!("STS action {action} is not simulated"),
        ));
    }
    let role = params
        .string("RoleArn")
        .ok_or_else(|| ApiError::client("MissingParameter", "RoleArn is required"))?;
    let config = control.config();
    let Some(external_id) = config.roles.get(&role) else {
        return Err(denied(format!(
            "not authorized to perform sts:AssumeRole on resource: {role}"
        )));
    };
    if external_id.is_some() && params.string("ExternalId") != *external_id {
        return Err(denied(format!(
            "the external ID does not match the trust policy of {role}"
        )));
    }
    let account = role.split(':').nth(4).unwrap_or_default().to_string();
    let n = control.images().len() + control.snapshots().len() + config.identities.len();
    let key = format!("ASIASIM{n:013}");
    let secret = format!("sim-session-secret-{n}");
    control.update_config(|c| {
        c.identities.insert(
            key.clone(),
            Identity {
                account: account.clone(),
                secret_access_key: Some(secret.clone()),
            },
        );
    });
    let session = params.string("RoleSessionName").unwrap_or_default();
    Ok(format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
         <Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>\
         <SessionToken>sim-session-token-{n}</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>\
         <AssumedRoleUser><AssumedRoleId>AROASIM:{session}</AssumedRoleId><Arn>{role}/{session}</Arn></AssumedRoleUser>\
         </AssumeRoleResult><ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></AssumeRoleResponse>"
    ))
}

type Ctl = State<Arc<Control>>;

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": message})),
    )
        .into_response()
}

async fn stats(State(control): Ctl) -> Response {
    Json(control.calls()).into_response()
}

async fn reset(State(control): Ctl) -> StatusCode {
    control.reset();
    StatusCode::NO_CONTENT
}

async fn get_config(State(control): Ctl) -> Response {
    Json(control.config()).into_response()
}

/// Merges the given fields into the current configuration.
async fn patch_config(State(control): Ctl, Json(patch): Json<Value>) -> Response {
    let Value::Object(fields) = patch else {
        return bad_request("expected a JSON object".to_string());
    };
    let mut current = serde_json::to_value(control.config()).expect("config serializes");
    if let Value::Object(map) = &mut current {
        map.extend(fields);
    }
    match serde_json::from_value::<SimConfig>(current) {
        Ok(config) => {
            control.update_config(|c| *c = config.clone());
            Json(config).into_response()
        }
        Err(e) => bad_request(e.to_string()),
    }
}

async fn list_faults(State(control): Ctl) -> Response {
    Json(control.faults()).into_response()
}

async fn add_fault(State(control): Ctl, Json(rule): Json<FaultRule>) -> StatusCode {
    control.add_fault(rule);
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(control): Ctl) -> StatusCode {
    control.clear_faults();
    StatusCode::NO_CONTENT
}

async fn list_images(State(control): Ctl) -> Response {
    Json(control.images()).into_response()
}

async fn seed_image(State(control): Ctl, Json(seed): Json<SeedImage>) -> Response {
    if seed.name.is_empty() {
        return bad_request("an image needs a name".to_string());
    }
    let id = control.seed_image(seed);
    Json(serde_json::json!({ "image_id": id })).into_response()
}

async fn list_snapshots(State(control): Ctl) -> Response {
    Json(control.snapshots()).into_response()
}

async fn list_launch_templates(State(control): Ctl) -> Response {
    Json(control.launch_templates()).into_response()
}

async fn list_instances(State(control): Ctl) -> Response {
    Json(control.instances()).into_response()
}

#[derive(Deserialize)]
struct Advance {
    ms: u64,
}

async fn advance(State(control): Ctl, Json(by): Json<Advance>) -> StatusCode {
    control.advance(std::time::Duration::from_millis(by.ms));
    StatusCode::NO_CONTENT
}

async fn finish_copies(State(control): Ctl) -> StatusCode {
    control.finish_copies();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct EncryptionByDefault {
    account: Option<String>,
    region: String,
    enabled: bool,
}

async fn encryption_by_default(
    State(control): Ctl,
    Json(req): Json<EncryptionByDefault>,
) -> StatusCode {
    let account = req
        .account
        .unwrap_or_else(|| control.config().default_account);
    control.set_encryption_by_default(&account, &req.region, req.enabled);
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::210987654321:role/copier";

    fn assume(control: &Control, external_id: Option<&str>) -> Result<String, String> {
        let mut pairs = vec![("RoleArn", ROLE), ("RoleSessionName", "test")];
        pairs.extend(external_id.map(|id| ("ExternalId", id)));
        assume_role(control, "AssumeRole", &Params::from_pairs(pairs), "r-1").map_err(|e| e.code)
    }

    #[test]
    fn roles_are_granted_and_revoked_at_runtime() {
        let control = Control::new(SimConfig::default());
        let denied = Err("AccessDenied".to_string());
        assert_eq!(assume(&control, None), denied);

        control.update_config(|c| {
            c.roles.insert(ROLE.to_string(), None);
        });
        let answer = assume(&control, None).unwrap();
        let key = answer
            .split_once("<AccessKeyId>")
            .and_then(|(_, rest)| rest.split_once('<'))
            .map(|(key, _)| key)
            .unwrap();
        assert_eq!(control.config().identity(key).account, "210987654321");

        control.update_config(|c| {
            c.roles.remove(ROLE);
        });
        assert_eq!(assume(&control, None), denied, "revoked");

        control.update_config(|c| {
            c.roles.insert(ROLE.to_string(), Some("ext-1".to_string()));
        });
        assert_eq!(
            assume(&control, None),
            denied,
            "granted anew, with an external ID"
        );
        assert_eq!(assume(&control, Some("ext-2")), denied);
        assert!(assume(&control, Some("ext-1")).is_ok());
    }
}
