//! Launch templates and their versions, per account and region. Only the
//! AMI of the launch template data is modelled: what matters to an image's
//! owner is whether some template still launches from it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::query::{Filter, Page, check_page, matches_filters, paginate};
use super::{Ctx, State, is_hex_id};
use crate::wire::{ApiError, ApiResult};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchTemplateVersion {
    pub number: i64,
    pub description: Option<String>,
    /// `LaunchTemplateData.ImageId`; EC2 checks it only at launch, so any
    /// value is kept, a deregistered image's ID included.
    pub image_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub create_time: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchTemplate {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub create_time: OffsetDateTime,
    pub default_version: i64,
    /// By version number; never empty, as version 1 comes with the template.
    pub versions: BTreeMap<i64, LaunchTemplateVersion>,
}

impl LaunchTemplate {
    pub fn latest_version(&self) -> i64 {
        self.versions
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.default_version)
    }

    fn version_number(&self, spec: VersionSpec) -> ApiResult<i64> {
        let number = match spec {
            VersionSpec::Latest => self.latest_version(),
            VersionSpec::Default => self.default_version,
            VersionSpec::Number(n) => n,
        };
        if self.versions.contains_key(&number) {
            Ok(number)
        } else {
            Err(ApiError::client(
                "InvalidLaunchTemplateId.VersionNotFound",
                format!(
                    "Could not find launch template version {number} for launch template with ID {}",
                    self.id
                ),
            ))
        }
    }
}

/// Which launch template a call names: `LaunchTemplateId` or
/// `LaunchTemplateName`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateRef {
    Id(String),
    Name(String),
}

/// A version as a call gives it: `$Latest`, `$Default` or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Default,
    Number(i64),
}

impl VersionSpec {
    pub fn parse(param: &str, value: &str) -> ApiResult<Self> {
        match value {
            "$Latest" => Ok(Self::Latest),
            "$Default" => Ok(Self::Default),
            n => n.parse().map(Self::Number).map_err(|_| {
                ApiError::invalid_value(param, value, "Expected $Latest, $Default or a number.")
            }),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateLaunchTemplate {
    pub name: String,
    pub version_description: Option<String>,
    pub image_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateLaunchTemplateVersion {
    pub template: TemplateRef,
    /// The version whose data the new one starts from.
    pub source_version: Option<VersionSpec>,
    pub version_description: Option<String>,
    pub image_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionQuery {
    /// `None` asks across every launch template of the account and region,
    /// for their `$Latest` and/or `$Default` versions.
    pub template: Option<TemplateRef>,
    pub versions: Vec<VersionSpec>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

/// One launch template version, with the template it belongs to.
#[derive(Clone, Copy, Debug)]
pub struct VersionView<'a> {
    pub template: &'a LaunchTemplate,
    pub version: &'a LaunchTemplateVersion,
}

impl VersionView<'_> {
    pub fn is_default(&self) -> bool {
        self.version.number == self.template.default_version
    }

    /// The order pages follow: by template ID, then version number.
    fn page_key(&self) -> String {
        format!("{}/{:019}", self.template.id, self.version.number)
    }
}

fn version_filter_values(view: &VersionView, name: &str) -> Option<Vec<String>> {
    match name {
        "image-id" => Some(view.version.image_id.iter().cloned().collect()),
        "is-default-version" => Some(vec![view.is_default().to_string()]),
        _ => None,
    }
}

/// Launch template names: 3 to 128 of letters, digits and `()./-_`.
fn check_template_name(name: &str) -> ApiResult<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "()./-_".contains(c);
    if (3..=128).contains(&name.chars().count()) && name.chars().all(allowed) {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidLaunchTemplateName.MalformedException",
            format!(
                "Launch template name {name} is malformed: it must be 3 to 128 characters of letters, numbers and ( ) . / - _"
            ),
        ))
    }
}

fn check_version_description(description: Option<&str>) -> ApiResult<()> {
    match description {
        Some(d) if d.chars().count() > 255 => Err(ApiError::invalid_value(
            "VersionDescription",
            d,
            "Length must be at most 255.",
        )),
        _ => Ok(()),
    }
}

impl State {
    /// The ID of the caller's launch template that `template` names.
    fn template_id(&self, ctx: &Ctx, template: &TemplateRef) -> ApiResult<String> {
        let mine = |t: &&LaunchTemplate| t.region == ctx.region() && t.owner == ctx.account();
        match template {
            TemplateRef::Id(id) => {
                if !is_hex_id(id, "lt-") {
                    return Err(ApiError::client(
                        "InvalidLaunchTemplateId.Malformed",
                        format!("The launch template ID '{id}' is malformed (expecting \"lt-...\")"),
                    ));
                }
                self.launch_templates
                    .get(id)
                    .filter(mine)
                    .map(|t| t.id.clone())
                    .ok_or_else(|| {
                        ApiError::client(
                            "InvalidLaunchTemplateId.NotFound",
                            format!("The specified launch template, with template ID {id}, does not exist."),
                        )
                    })
            }
            TemplateRef::Name(name) => self
                .launch_templates
                .values()
                .filter(mine)
                .find(|t| t.name == *name)
                .map(|t| t.id.clone())
                .ok_or_else(|| {
                    ApiError::client(
                        "InvalidLaunchTemplateName.NotFoundException",
                        format!("The specified launch template, with template name {name}, does not exist."),
                    )
                }),
        }
    }

    fn template_mut(
        &mut self,
        ctx: &Ctx,
        template: &TemplateRef,
    ) -> ApiResult<&mut LaunchTemplate> {
        let id = self.template_id(ctx, template)?;
        Ok(self.launch_templates.get_mut(&id).expect("found above"))
    }

    pub fn create_launch_template(
        &mut self,
        ctx: &Ctx,
        req: CreateLaunchTemplate,
    ) -> ApiResult<&LaunchTemplate> {
        check_template_name(&req.name)?;
        check_version_description(req.version_description.as_deref())?;
        if self
            .template_id(ctx, &TemplateRef::Name(req.name.clone()))
            .is_ok()
        {
            return Err(ApiError::client(
                "InvalidLaunchTemplateName.AlreadyExistsException",
                format!("Launch template name {} already in use.", req.name),
            ));
        }
        let id = self.new_id("lt");
        let first = LaunchTemplateVersion {
            number: 1,
            description: req.version_description,
            image_id: req.image_id,
            create_time: ctx.now,
        };
        let template = LaunchTemplate {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            name: req.name,
            create_time: ctx.now,
            default_version: 1,
            versions: BTreeMap::from([(1, first)]),
        };
        Ok(self.launch_templates.entry(id).or_insert(template))
    }

    /// A new version numbered after the latest; the default stays as it
    /// was. Without `ImageId` the new version keeps the source version's.
    pub fn create_launch_template_version(
        &mut self,
        ctx: &Ctx,
        req: CreateLaunchTemplateVersion,
    ) -> ApiResult<VersionView<'_>> {
        check_version_description(req.version_description.as_deref())?;
        let template = self.template_mut(ctx, &req.template)?;
        let source_image = match req.source_version {
            Some(spec) => template.versions[&template.version_number(spec)?]
                .image_id
                .clone(),
            None => None,
        };
        let number = template.latest_version() + 1;
        let version = LaunchTemplateVersion {
            number,
            description: req.version_description,
            image_id: req.image_id.or(source_image),
            create_time: ctx.now,
        };
        template.versions.insert(number, version);
        let template = &*template;
        Ok(VersionView {
            template,
            version: &template.versions[&number],
        })
    }

    /// ModifyLaunchTemplate: `SetDefaultVersion`, when given, must name an
    /// existing version.
    pub fn modify_launch_template(
        &mut self,
        ctx: &Ctx,
        template: &TemplateRef,
        default_version: Option<VersionSpec>,
    ) -> ApiResult<&LaunchTemplate> {
        let template = self.template_mut(ctx, template)?;
        if let Some(spec) = default_version {
            template.default_version = template.version_number(spec)?;
        }
        Ok(template)
    }

    /// DeleteLaunchTemplate, with every version; returns what was deleted.
    pub fn delete_launch_template(
        &mut self,
        ctx: &Ctx,
        template: &TemplateRef,
    ) -> ApiResult<LaunchTemplate> {
        let id = self.template_id(ctx, template)?;
        Ok(self.launch_templates.remove(&id).expect("found above"))
    }

    /// DescribeLaunchTemplateVersions: the given versions of one template
    /// (all of them when none is given), or, with no template, the
    /// `$Latest` and/or `$Default` version of every template of the caller
    /// in its region. A version asked for twice (`$Latest` and `$Default`
    /// being the same) is listed once.
    pub fn describe_launch_template_versions(
        &self,
        ctx: &Ctx,
        query: &VersionQuery,
    ) -> ApiResult<(Vec<VersionView<'_>>, Option<String>)> {
        check_page(&query.page, 1..=200)?;
        let templates: Vec<&LaunchTemplate> = match &query.template {
            Some(template) => vec![&self.launch_templates[&self.template_id(ctx, template)?]],
            None => {
                if query.versions.is_empty() {
                    return Err(ApiError::missing(
                        "LaunchTemplateId, LaunchTemplateName or LaunchTemplateVersion ($Latest or $Default)",
                    ));
                }
                if let Some(VersionSpec::Number(n)) = query
                    .versions
                    .iter()
                    .find(|v| matches!(v, VersionSpec::Number(_)))
                {
                    return Err(ApiError::invalid_value(
                        "LaunchTemplateVersion",
                        &n.to_string(),
                        "Without a launch template, only $Latest and $Default can be given.",
                    ));
                }
                self.launch_templates
                    .values()
                    .filter(|t| t.region == ctx.region() && t.owner == ctx.account())
                    .collect()
            }
        };
        let mut selected = Vec::new();
        for template in templates {
            let numbers: BTreeSet<i64> = if query.versions.is_empty() {
                template.versions.keys().copied().collect()
            } else {
                query
                    .versions
                    .iter()
                    .map(|spec| template.version_number(*spec))
                    .collect::<ApiResult<_>>()?
            };
            for number in numbers {
                let view = VersionView {
                    template,
                    version: &template.versions[&number],
                };
                if matches_filters(&view, &query.filters, version_filter_values)? {
                    selected.push((view.page_key(), view));
                }
            }
        }
        paginate(selected, &query.page)
    }
}
