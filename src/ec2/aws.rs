//! aws-sdk-ec2 behind the [`Ec2`] seam.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    CreateVolumePermission, CreateVolumePermissionModifications, Filter, Image, LaunchPermission,
    LaunchPermissionModifications, PermissionGroup, ResourceType, SnapshotAttributeName, Tag,
    TagSpecification,
};
use aws_sdk_ec2::{Client, config::Region};
use aws_smithy_async::future::pagination_stream::PaginationStream;

use super::{
    CopyRequest, Ec2, Ec2Error, ErrorKind, ImageInfo, ImageQuery, Permission, Scope, SnapshotInfo,
    SnapshotRef,
};
use crate::api::{TargetState, UID_TAG};
use crate::metrics::Metrics;

/// The clients of one scope, sharing its credentials.
#[derive(Clone)]
struct Clients {
    ec2: Client,
    ssm: aws_sdk_ssm::Client,
}

/// aws-sdk-ec2 behind the [`Ec2`] seam, with one client per region built
/// from a shared configuration (credentials from the standard chain).
#[derive(Clone)]
pub struct AwsEc2 {
    base: aws_config::SdkConfig,
    endpoint_url: Option<String>,
    sts_endpoint_url: Option<String>,
    ssm_endpoint_url: Option<String>,
    clients: Arc<RwLock<HashMap<Scope, Clients>>>,
    metrics: Arc<Metrics>,
    own_account: Arc<tokio::sync::OnceCell<String>>,
}

impl AwsEc2 {
    pub fn new(
        base: aws_config::SdkConfig,
        endpoint_url: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            base,
            endpoint_url,
            sts_endpoint_url: None,
            ssm_endpoint_url: None,
            clients: Arc::default(),
            metrics,
            own_account: Arc::default(),
        }
    }

    /// Loads credentials and settings from the standard aws-config chain
    /// (environment, profile, IRSA web identity, EKS Pod Identity, IMDS).
    pub async fn from_env(endpoint_url: Option<String>, metrics: Arc<Metrics>) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_secs(20))
            .operation_timeout(Duration::from_secs(60))
            .build();
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .load()
            .await;
        Self::new(base, endpoint_url, metrics)
    }

    /// STS endpoint for assumed roles (local peers); AWS's otherwise.
    pub fn with_sts_endpoint(mut self, url: Option<String>) -> Self {
        self.sts_endpoint_url = url;
        self
    }

    /// SSM endpoint for publishing (local peers); AWS's otherwise.
    pub fn with_ssm_endpoint(mut self, url: Option<String>) -> Self {
        self.ssm_endpoint_url = url;
        self
    }

    /// The EC2 client of a scope.
    async fn client(&self, scope: &Scope) -> Client {
        self.clients(scope).await.ec2
    }

    /// The SSM client of a scope.
    async fn ssm(&self, scope: &Scope) -> aws_sdk_ssm::Client {
        self.clients(scope).await.ssm
    }

    /// The clients of a scope, cached: for a role, their credentials come
    /// from STS AssumeRole and are refreshed before they expire.
    async fn clients(&self, scope: &Scope) -> Clients {
        if let Some(c) = self.clients.read().expect("client cache lock").get(scope) {
            return c.clone();
        }
        let region = Region::new(scope.region.clone());
        let mut ec2 = aws_sdk_ec2::config::Builder::from(&self.base).region(region.clone());
        let mut ssm = aws_sdk_ssm::config::Builder::from(&self.base).region(region.clone());
        if let Some(role) = &scope.role {
            let mut sts = self.base.clone().into_builder();
            if let Some(url) = &self.sts_endpoint_url {
                sts = sts.endpoint_url(url);
            }
            let mut assume = aws_config::sts::AssumeRoleProvider::builder(&role.arn)
                .session_name(role.session.as_deref().unwrap_or(super::OPERATOR_SESSION))
                .region(region)
                .configure(&sts.build());
            if let Some(id) = &role.external_id {
                assume = assume.external_id(id);
            }
            let provider = SharedCredentialsProvider::new(assume.build().await);
            ec2 = ec2.credentials_provider(provider.clone());
            ssm = ssm.credentials_provider(provider);
        }
        if let Some(url) = &self.endpoint_url {
            ec2 = ec2.endpoint_url(url);
        }
        if let Some(url) = &self.ssm_endpoint_url {
            ssm = ssm.endpoint_url(url);
        }
        let clients = Clients {
            ec2: Client::from_conf(ec2.build()),
            ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
        };
        self.clients
            .write()
            .expect("client cache lock")
            .entry(scope.clone())
            .or_insert(clients)
            .clone()
    }

    /// Runs one call, counting it by operation, region and outcome.
    async fn call<T, E, F>(&self, op: &'static str, scope: &Scope, fut: F) -> Result<T, Ec2Error>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        let start = Instant::now();
        let res = fut.await;
        self.record(op, scope, start, res)
    }

    /// Every page of a request the SDK paginates, each page counted as one
    /// call.
    async fn pages<T, E>(
        &self,
        op: &'static str,
        scope: &Scope,
        mut pages: PaginationStream<Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<Vec<T>, Ec2Error>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut out = Vec::new();
        loop {
            let start = Instant::now();
            match pages.next().await {
                Some(page) => out.push(self.record(op, scope, start, page)?),
                None => return Ok(out),
            }
        }
    }

    /// Counts one call by operation, region and outcome.
    fn record<T, E>(
        &self,
        op: &'static str,
        scope: &Scope,
        start: Instant,
        res: Result<T, SdkError<E, HttpResponse>>,
    ) -> Result<T, Ec2Error>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let res = res.map_err(from_sdk);
        let outcome = match &res {
            Ok(_) => "ok",
            Err(e) => match e.kind {
                ErrorKind::NotFound => "not_found",
                ErrorKind::Throttled => "throttled",
                ErrorKind::Transient => "transient",
                ErrorKind::Rejected => "rejected",
                ErrorKind::Credentials => "credentials",
            },
        };
        self.metrics
            .ec2_call(op, &scope.region, outcome, start.elapsed());
        res
    }

    /// Every image matching `owners` and `filters`, all pages.
    async fn all_images(
        &self,
        scope: &Scope,
        owners: Vec<String>,
        filters: Vec<Filter>,
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        let req = self
            .client(scope)
            .await
            .describe_images()
            .set_owners(Some(owners))
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let pages = self.pages("DescribeImages", scope, req).await?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.images.unwrap_or_default())
            .map(image_info)
            .collect())
    }
}

fn from_sdk<E>(err: SdkError<E, HttpResponse>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            match e.code() {
                Some(code) => Ec2Error::new(code, e.message().unwrap_or_default()),
                None => {
                    let status = se.raw().status().as_u16();
                    let code = if status >= 500 {
                        "InternalError"
                    } else {
                        "Unknown"
                    };
                    Ec2Error::new(code, format!("HTTP {status} without an EC2 error code"))
                }
            }
        }
        SdkError::TimeoutError(_) => Ec2Error::new("Timeout", "the request to EC2 timed out"),
        SdkError::DispatchFailure(_) if credentials_failed(&err) => Ec2Error::new(
            super::CREDENTIALS_UNAVAILABLE,
            aws_sdk_ec2::error::DisplayErrorContext(&err).to_string(),
        ),
        SdkError::DispatchFailure(d) => {
            Ec2Error::new("Dispatch", format!("could not reach EC2: {d:?}"))
        }
        SdkError::ResponseError(_) => Ec2Error::new("Response", "EC2's response could not be read"),
        _ => Ec2Error::new(
            "Unknown",
            aws_sdk_ec2::error::DisplayErrorContext(&err).to_string(),
        ),
    }
}

/// The request never left: no credentials could be had (the chain found
/// none, they expired, or STS refused to assume the role).
fn credentials_failed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<aws_credential_types::provider::error::CredentialsError>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn tag_filter(uid: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{UID_TAG}"))
        .values(uid)
        .build()
}

fn to_tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn from_tags(tags: Vec<Tag>) -> BTreeMap<String, String> {
    tags.into_iter()
        .filter_map(|t| Some((t.key?, t.value.unwrap_or_default())))
        .collect()
}

/// What the operator reads of EC2's description of an image. Takes it whole
/// and moves its strings: drift rounds read tens of thousands at a time.
fn image_info(img: Image) -> ImageInfo {
    ImageInfo {
        id: img.image_id.unwrap_or_default(),
        name: img.name,
        state: img
            .state
            .map(|s| TargetState::from(s.as_str()))
            .unwrap_or_default(),
        state_reason: img.state_reason.and_then(|r| r.message),
        owner_id: img.owner_id,
        owner_alias: img.image_owner_alias,
        root_device_type: img.root_device_type.map(|t| t.as_str().to_owned()),
        virtualization_type: img.virtualization_type.map(|t| t.as_str().to_owned()),
        snapshots: img
            .block_device_mappings
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.ebs)
            .filter_map(|ebs| {
                Some(SnapshotRef {
                    id: ebs.snapshot_id?,
                    encrypted: ebs.encrypted.unwrap_or(false),
                    kms_key_id: ebs.kms_key_id,
                })
            })
            .collect(),
        tags: from_tags(img.tags.unwrap_or_default()),
        product_codes: img
            .product_codes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.product_code_id)
            .collect(),
        creation_date: img.creation_date,
        deprecation_time: img.deprecation_time,
        source_image_id: img.source_image_id,
        deregistration_protection: img.deregistration_protection,
        last_launched_time: img.last_launched_time,
    }
}

impl Ec2 for AwsEc2 {
    async fn describe_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> Result<Option<ImageInfo>, Ec2Error> {
        let req = self
            .client(scope)
            .await
            .describe_images()
            .image_ids(image_id)
            .send();
        match self.call("DescribeImages", scope, req).await {
            Ok(out) => Ok(out
                .images
                .unwrap_or_default()
                .into_iter()
                .find(|i| i.image_id() == Some(image_id))
                .map(image_info)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn describe_images_by_ids(
        &self,
        scope: &Scope,
        image_ids: &[String],
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        if image_ids.is_empty() {
            return Ok(Vec::new());
        }
        // A filter rather than ImageIds: a missing ID is left out instead of
        // failing the whole batch.
        let filter = Filter::builder()
            .name("image-id")
            .set_values(Some(image_ids.to_vec()))
            .build();
        let req = self
            .client(scope)
            .await
            .describe_images()
            .filters(filter)
            .send();
        let out = self.call("DescribeImages", scope, req).await?;
        Ok(out
            .images
            .unwrap_or_default()
            .into_iter()
            .map(image_info)
            .collect())
    }

    async fn owned_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> Result<Option<ImageInfo>, Ec2Error> {
        let req = self
            .client(scope)
            .await
            .describe_images()
            .owners("self")
            .image_ids(image_id)
            .send();
        match self.call("DescribeImages", scope, req).await {
            Ok(out) => Ok(out
                .images
                .unwrap_or_default()
                .into_iter()
                .find(|i| i.image_id() == Some(image_id))
                .map(image_info)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn owned_images(&self, scope: &Scope, uid: &str) -> Result<Vec<ImageInfo>, Ec2Error> {
        self.all_images(scope, vec!["self".into()], vec![tag_filter(uid)])
            .await
    }

    async fn copy_image(&self, scope: &Scope, req: &CopyRequest) -> Result<String, Ec2Error> {
        let tags = to_tags(&req.tags);
        let spec = |rt: ResourceType| {
            TagSpecification::builder()
                .resource_type(rt)
                .set_tags(Some(tags.clone()))
                .build()
        };
        let call = self
            .client(scope)
            .await
            .copy_image()
            .source_region(&req.source_region)
            .source_image_id(&req.source_image_id)
            .name(&req.name)
            .description(&req.description)
            .set_encrypted(req.encrypted)
            .set_kms_key_id(req.kms_key_id.clone())
            .copy_image_tags(req.copy_image_tags)
            .client_token(&req.client_token)
            .set_snapshot_copy_completion_duration_minutes(req.completion_minutes)
            .tag_specifications(spec(ResourceType::Image))
            .tag_specifications(spec(ResourceType::Snapshot))
            .send();
        let out = self.call("CopyImage", scope, call).await?;
        out.image_id()
            .map(str::to_owned)
            .ok_or_else(|| Ec2Error::new("Response", "CopyImage returned no image ID"))
    }

    async fn create_tags(
        &self,
        scope: &Scope,
        resource_ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), Ec2Error> {
        let req = self
            .client(scope)
            .await
            .create_tags()
            .set_resources(Some(resource_ids.to_vec()))
            .set_tags(Some(to_tags(tags)))
            .send();
        self.call("CreateTags", scope, req).await.map(drop)
    }

    async fn delete_tags(
        &self,
        scope: &Scope,
        resource_ids: &[String],
        keys: &[String],
    ) -> Result<(), Ec2Error> {
        let tags = keys.iter().map(|k| Tag::builder().key(k).build()).collect();
        let req = self
            .client(scope)
            .await
            .delete_tags()
            .set_resources(Some(resource_ids.to_vec()))
            .set_tags(Some(tags))
            .send();
        self.call("DeleteTags", scope, req).await.map(drop)
    }

    async fn deregister_image(&self, scope: &Scope, image_id: &str) -> Result<(), Ec2Error> {
        let req = self
            .client(scope)
            .await
            .deregister_image()
            .image_id(image_id)
            .send();
        match self.call("DeregisterImage", scope, req).await {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn describe_snapshots(
        &self,
        scope: &Scope,
        snapshot_ids: &[String],
    ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
        if snapshot_ids.is_empty() {
            return Ok(Vec::new());
        }
        // A filter rather than SnapshotIds: a missing ID is left out instead
        // of failing the whole call.
        let filter = Filter::builder()
            .name("snapshot-id")
            .set_values(Some(snapshot_ids.to_vec()))
            .build();
        let req = self
            .client(scope)
            .await
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter)
            .send();
        let out = self.call("DescribeSnapshots", scope, req).await?;
        Ok(out
            .snapshots
            .unwrap_or_default()
            .into_iter()
            .filter_map(snapshot_info)
            .collect())
    }

    async fn owned_snapshots(
        &self,
        scope: &Scope,
        uid: &str,
    ) -> Result<Vec<SnapshotInfo>, Ec2Error> {
        let req = self
            .client(scope)
            .await
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(uid))
            .into_paginator()
            .send();
        let pages = self.pages("DescribeSnapshots", scope, req).await?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.snapshots.unwrap_or_default())
            .filter_map(snapshot_info)
            .collect())
    }

    async fn delete_snapshot(&self, scope: &Scope, snapshot_id: &str) -> Result<(), Ec2Error> {
        let req = self
            .client(scope)
            .await
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send();
        match self.call("DeleteSnapshot", scope, req).await {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn set_launch_permissions(
        &self,
        scope: &Scope,
        image_id: &str,
        add: &[Permission],
        remove: &[Permission],
    ) -> Result<(), Ec2Error> {
        let perm = |p: &Permission| {
            let b = LaunchPermission::builder();
            match p {
                Permission::Account(id) => b.user_id(id),
                Permission::Organization(arn) => b.organization_arn(arn),
                Permission::OrganizationalUnit(arn) => b.organizational_unit_arn(arn),
                Permission::Public => b.group(PermissionGroup::All),
            }
            .build()
        };
        let change = LaunchPermissionModifications::builder()
            .set_add((!add.is_empty()).then(|| add.iter().map(perm).collect()))
            .set_remove((!remove.is_empty()).then(|| remove.iter().map(perm).collect()))
            .build();
        let req = self
            .client(scope)
            .await
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(change)
            .send();
        self.call("ModifyImageAttribute", scope, req)
            .await
            .map(drop)
    }

    async fn set_snapshot_permissions(
        &self,
        scope: &Scope,
        snapshot_id: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), Ec2Error> {
        let perm = |id: &String| CreateVolumePermission::builder().user_id(id).build();
        let change = CreateVolumePermissionModifications::builder()
            .set_add((!add.is_empty()).then(|| add.iter().map(perm).collect()))
            .set_remove((!remove.is_empty()).then(|| remove.iter().map(perm).collect()))
            .build();
        let req = self
            .client(scope)
            .await
            .modify_snapshot_attribute()
            .snapshot_id(snapshot_id)
            .attribute(SnapshotAttributeName::CreateVolumePermission)
            .create_volume_permission(change)
            .send();
        self.call("ModifySnapshotAttribute", scope, req)
            .await
            .map(drop)
    }

    async fn deprecate_image(
        &self,
        scope: &Scope,
        image_id: &str,
        at: &str,
    ) -> Result<(), Ec2Error> {
        let at = aws_sdk_ec2::primitives::DateTime::from_str(
            at,
            aws_sdk_ec2::primitives::DateTimeFormat::DateTime,
        )
        .map_err(|e| {
            Ec2Error::new(
                "InvalidParameterValue",
                format!("deprecation time {at}: {e}"),
            )
        })?;
        let req = self
            .client(scope)
            .await
            .enable_image_deprecation()
            .image_id(image_id)
            .deprecate_at(at)
            .send();
        self.call("EnableImageDeprecation", scope, req)
            .await
            .map(drop)
    }

    async fn own_account(&self) -> Option<String> {
        let ask = || async {
            let mut conf = self.base.clone().into_builder();
            if let Some(url) = &self.sts_endpoint_url {
                conf = conf.endpoint_url(url);
            }
            let sts = aws_sdk_sts::Client::new(&conf.build());
            let reply = sts.get_caller_identity().send().await;
            match reply.map(|r| r.account().map(str::to_owned)) {
                Ok(Some(account)) => Ok(account),
                Ok(None) => Err("STS named no account"),
                Err(e) => {
                    tracing::warn!(error = %aws_sdk_sts::error::DisplayErrorContext(&e), "STS GetCallerIdentity failed; retrying later");
                    Err("STS GetCallerIdentity failed")
                }
            }
        };
        self.own_account.get_or_try_init(ask).await.ok().cloned()
    }

    async fn set_deregistration_protection(
        &self,
        scope: &Scope,
        image_id: &str,
        on: bool,
    ) -> Result<(), Ec2Error> {
        let client = self.client(scope).await;
        if on {
            // Without cooldown: the operator lifts the protection right
            // before it retires the copy, which a 24-hour cooldown would
            // hold up for a day.
            let req = client
                .enable_image_deregistration_protection()
                .image_id(image_id)
                .with_cooldown(false)
                .send();
            self.call("EnableImageDeregistrationProtection", scope, req)
                .await
                .map(drop)
        } else {
            let req = client
                .disable_image_deregistration_protection()
                .image_id(image_id)
                .send();
            self.call("DisableImageDeregistrationProtection", scope, req)
                .await
                .map(drop)
        }
    }

    async fn disable_image(&self, scope: &Scope, image_id: &str) -> Result<(), Ec2Error> {
        let req = self
            .client(scope)
            .await
            .disable_image()
            .image_id(image_id)
            .send();
        self.call("DisableImage", scope, req).await.map(drop)
    }

    async fn images_in_use(
        &self,
        scope: &Scope,
        image_ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, Ec2Error> {
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if image_ids.is_empty() {
            return Ok(users);
        }
        fn among<'a>(ids: &[String], id: Option<&'a str>) -> Option<&'a str> {
            id.filter(|id| ids.iter().any(|w| w == id))
        }
        let client = self.client(scope).await;
        for chunk in image_ids.chunks(super::MAX_IDS_PER_CALL) {
            let image_filter = Filter::builder()
                .name("image-id")
                .set_values(Some(chunk.to_vec()))
                .build();
            let req = client
                .describe_launch_template_versions()
                .versions("$Default")
                .versions("$Latest")
                .filters(image_filter.clone())
                .into_paginator()
                .send();
            for page in self
                .pages("DescribeLaunchTemplateVersions", scope, req)
                .await?
            {
                for v in page.launch_template_versions() {
                    // Matched again here: a peer may not apply the filter.
                    let image = v.launch_template_data().and_then(|d| d.image_id());
                    if let Some(image) = among(image_ids, image) {
                        let version = if v.default_version() == Some(true) {
                            "$Default".to_owned()
                        } else {
                            format!("version {}", v.version_number().unwrap_or_default())
                        };
                        let template = v.launch_template_id().unwrap_or("?");
                        users
                            .entry(image.to_owned())
                            .or_default()
                            .push(format!("launch template {template} ({version})"));
                    }
                }
            }
            let states = Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build();
            let req = client
                .describe_instances()
                .filters(image_filter)
                .filters(states)
                .into_paginator()
                .send();
            for page in self.pages("DescribeInstances", scope, req).await? {
                for i in page.reservations().iter().flat_map(|r| r.instances()) {
                    let state = i.state().and_then(|s| s.name()).map(|n| n.as_str());
                    let live =
                        matches!(state, Some("pending" | "running" | "stopping" | "stopped"));
                    if let (Some(image), true) = (among(image_ids, i.image_id()), live) {
                        let id = i.instance_id().unwrap_or("?");
                        users
                            .entry(image.to_owned())
                            .or_default()
                            .push(format!("instance {id} ({})", state.unwrap_or_default()));
                    }
                }
            }
        }
        for list in users.values_mut() {
            list.sort();
            list.dedup();
        }
        Ok(users)
    }

    async fn get_parameter(&self, scope: &Scope, name: &str) -> Result<Option<String>, Ec2Error> {
        let req = self.ssm(scope).await.get_parameter().name(name).send();
        match self.call("GetParameter", scope, req).await {
            Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_owned)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_parameter(
        &self,
        scope: &Scope,
        name: &str,
        image_id: &str,
    ) -> Result<(), Ec2Error> {
        let req = self
            .ssm(scope)
            .await
            .put_parameter()
            .name(name)
            .value(image_id)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .description("AMI ID published by ami-copy-operator")
            .send();
        self.call("PutParameter", scope, req).await.map(drop)
    }

    async fn delete_parameter(&self, scope: &Scope, name: &str) -> Result<(), Ec2Error> {
        let req = self.ssm(scope).await.delete_parameter().name(name).send();
        match self.call("DeleteParameter", scope, req).await {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn find_images(
        &self,
        scope: &Scope,
        query: &ImageQuery,
    ) -> Result<Vec<ImageInfo>, Ec2Error> {
        let owners = if query.owners.is_empty() {
            vec!["self".to_owned()]
        } else {
            query.owners.clone()
        };
        let mut filters = vec![Filter::builder().name("state").values("available").build()];
        if let Some(name) = &query.name {
            filters.push(Filter::builder().name("name").values(name).build());
        }
        for (k, v) in &query.tags {
            filters.push(Filter::builder().name(format!("tag:{k}")).values(v).build());
        }
        self.all_images(scope, owners, filters).await
    }
}

fn snapshot_info(s: aws_sdk_ec2::types::Snapshot) -> Option<SnapshotInfo> {
    Some(SnapshotInfo {
        id: s.snapshot_id?,
        tags: from_tags(s.tags.unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::ec2::{OPERATIONS, SSM_OPERATIONS, classify};

    /// The operation names `AwsEc2` passes to `call(...)`, read from this
    /// file's source (the part above the tests).
    fn called_operations() -> BTreeSet<String> {
        let source = include_str!("aws.rs");
        let code = &source[..source.find("#[cfg(test)]").expect("a test module")];
        [".call(\"", ".pages(\""]
            .iter()
            .flat_map(|needle| code.split(needle).skip(1))
            .map(|rest| rest[..rest.find('"').expect("a closing quote")].to_owned())
            .collect()
    }

    #[test]
    fn operations_lists_every_call_and_nothing_else() {
        let listed: BTreeSet<String> = OPERATIONS
            .iter()
            .chain(SSM_OPERATIONS)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            listed.len(),
            OPERATIONS.len() + SSM_OPERATIONS.len(),
            "OPERATIONS has duplicates"
        );
        assert_eq!(called_operations(), listed);
    }

    /// The least-privilege IAM policy allows exactly the EC2 actions the
    /// operator calls: a new call fails here until the policy has it.
    #[test]
    fn iam_policy_allows_exactly_the_operations() {
        let policy: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/iam-policy.json")).expect("valid JSON");
        let mut allowed = BTreeSet::new();
        let mut ssm = BTreeSet::new();
        for statement in policy["Statement"].as_array().expect("statements") {
            assert_eq!(statement["Effect"], "Allow", "{statement}");
            let actions = match &statement["Action"] {
                serde_json::Value::String(a) => vec![a.clone()],
                other => serde_json::from_value(other.clone()).expect("a list of actions"),
            };
            for action in actions {
                assert!(!action.contains('*'), "no wildcard actions: {action}");
                if let Some(op) = action.strip_prefix("ec2:") {
                    allowed.insert(op.to_owned());
                }
                if let Some(op) = action.strip_prefix("ssm:") {
                    // Parameters under the operator's prefix only.
                    assert_eq!(
                        statement["Resource"], "arn:aws:ssm:*:*:parameter/amicopy/*",
                        "{statement}"
                    );
                    ssm.insert(op.to_owned());
                }
            }
        }
        let expected: BTreeSet<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
        assert_eq!(allowed, expected);
        let expected: BTreeSet<String> = SSM_OPERATIONS.iter().map(|s| s.to_string()).collect();
        assert_eq!(ssm, expected);

        // docs/iam.md shows the same policy.
        let doc = include_str!("../../docs/iam.md");
        let shown = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("\n```").next())
            .expect("docs/iam.md starts its first JSON block with the policy");
        let shown: serde_json::Value = serde_json::from_str(shown).expect("valid JSON");
        assert_eq!(
            shown, policy,
            "docs/iam.md shows another policy than docs/iam-policy.json"
        );
    }

    #[test]
    fn classifies_error_codes() {
        let cases = [
            ("InvalidAMIID.NotFound", ErrorKind::NotFound),
            ("InvalidSnapshot.NotFound", ErrorKind::NotFound),
            ("InvalidAMIID.Unavailable", ErrorKind::NotFound),
            ("RequestLimitExceeded", ErrorKind::Throttled),
            ("ResourceLimitExceeded", ErrorKind::Throttled),
            ("InternalError", ErrorKind::Transient),
            ("Unavailable", ErrorKind::Transient),
            ("Dispatch", ErrorKind::Transient),
            ("CredentialsUnavailable", ErrorKind::Credentials),
            ("RequestExpired", ErrorKind::Credentials),
            ("InvalidAMIName.Duplicate", ErrorKind::Rejected),
            ("UnauthorizedOperation", ErrorKind::Rejected),
            ("ParameterNotFound", ErrorKind::NotFound),
            ("InvalidAMIID.Malformed", ErrorKind::Rejected),
        ];
        for (code, kind) in cases {
            assert_eq!(classify(code), kind, "{code}");
        }
    }
}
