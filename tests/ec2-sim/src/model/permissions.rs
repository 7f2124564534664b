//! Launch permissions on images and create-volume permissions on snapshots:
//! who besides the owner may use them.

use serde::{Deserialize, Serialize};

use super::{Ctx, State};
use crate::wire::{ApiError, ApiResult};

/// One entry of a launch or create-volume permission list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Permission {
    UserId(String),
    Group(String),
    OrganizationArn(String),
    OrganizationalUnitArn(String),
}

/// A launch-permission or create-volume-permission change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermissionChange {
    pub add: Vec<Permission>,
    pub remove: Vec<Permission>,
}

impl State {
    pub fn modify_launch_permission(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: &PermissionChange,
    ) -> ApiResult<()> {
        for permission in change.add.iter().chain(&change.remove) {
            check_permission(permission)?;
        }
        let image = self.owned_image_mut(ctx, id)?;
        apply_permissions(&mut image.launch_permissions, change);
        Ok(())
    }

    pub fn modify_create_volume_permission(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: &PermissionChange,
    ) -> ApiResult<()> {
        for permission in change.add.iter().chain(&change.remove) {
            match permission {
                Permission::UserId(_) | Permission::Group(_) => check_permission(permission)?,
                other => {
                    return Err(ApiError::client(
                        "InvalidParameterValue",
                        format!("{other:?} is not a create volume permission"),
                    ));
                }
            }
        }
        let snapshot = self.owned_snapshot_mut(ctx, id)?;
        apply_permissions(&mut snapshot.create_volume_permissions, change);
        Ok(())
    }
}

fn check_permission(permission: &Permission) -> ApiResult<()> {
    match permission {
        Permission::UserId(id) if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit()) => {
            Err(ApiError::client(
                "InvalidAMIAttributeItemValue",
                format!("Invalid attribute item value \"{id}\" for userId item type."),
            ))
        }
        Permission::Group(g) if g != "all" => Err(ApiError::client(
            "InvalidAMIAttributeItemValue",
            format!("Invalid attribute item value \"{g}\" for group item type."),
        )),
        Permission::OrganizationArn(arn) if !arn.starts_with("arn:aws:organizations::") => Err(
            ApiError::invalid_value("OrganizationArn", arn, "Not an organization ARN."),
        ),
        Permission::OrganizationalUnitArn(arn) if !arn.starts_with("arn:aws:organizations::") => {
            Err(ApiError::invalid_value(
                "OrganizationalUnitArn",
                arn,
                "Not an organizational unit ARN.",
            ))
        }
        _ => Ok(()),
    }
}

fn apply_permissions(list: &mut Vec<Permission>, change: &PermissionChange) {
    for p in &change.add {
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
    list.retain(|p| !change.remove.contains(p));
}
