//! Deregistration protection ("Protect an Amazon EC2 AMI from
//! deregistration"): the owner's guard against deregistering an image by
//! mistake, optionally with a 24-hour cooldown that keeps guarding after the
//! protection is turned off, so a hasty script cannot switch it off and
//! deregister in one go.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::images::Image;
use super::{Ctx, State};
use crate::wire::{ApiError, ApiResult, timestamp};

/// How long protection enabled with a cooldown still holds once disabled.
pub const COOLDOWN: Duration = Duration::hours(24);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeregistrationProtection {
    #[default]
    Disabled,
    EnabledWithoutCooldown,
    EnabledWithCooldown,
    /// Disabled, but the cooldown it was enabled with holds until `until`.
    DisabledUntil {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
}

impl DeregistrationProtection {
    /// The protection as it stands at `now`: a cooldown that has run out is
    /// plain `Disabled`. Worked out when asked rather than on every tick, so
    /// that no tick scans every image.
    pub fn at(self, now: OffsetDateTime) -> Self {
        match self {
            Self::DisabledUntil { until } if until <= now => Self::Disabled,
            other => other,
        }
    }

    /// The `deregistrationProtection` value DescribeImages reports.
    pub fn describe(self, now: OffsetDateTime) -> String {
        match self.at(now) {
            Self::Disabled => "disabled".to_string(),
            Self::EnabledWithoutCooldown => "enabled-without-cooldown".to_string(),
            Self::EnabledWithCooldown => "enabled-with-cooldown".to_string(),
            Self::DisabledUntil { until } => format!("disabled-until {}", timestamp(until)),
        }
    }
}

/// Refuses to deregister `image` while its protection holds.
pub(super) fn check_deregistrable(image: &Image, now: OffsetDateTime) -> ApiResult<()> {
    let how = match image.deregistration_protection.at(now) {
        DeregistrationProtection::Disabled => return Ok(()),
        DeregistrationProtection::DisabledUntil { until } => {
            format!(
                "disabled with a cooldown that holds until {}",
                timestamp(until)
            )
        }
        _ => "enabled".to_string(),
    };
    Err(ApiError::client(
        "OperationNotPermitted",
        format!(
            "Deregistration protection is enabled for image {} ({how}); it cannot be deregistered until protection is disabled.",
            image.id
        ),
    ))
}

impl State {
    /// EnableImageDeregistrationProtection: only the owner may, whatever
    /// the protection was (a running cooldown included).
    pub fn enable_deregistration_protection(
        &mut self,
        ctx: &Ctx,
        id: &str,
        with_cooldown: bool,
    ) -> ApiResult<()> {
        self.owned_image_mut(ctx, id)?.deregistration_protection = if with_cooldown {
            DeregistrationProtection::EnabledWithCooldown
        } else {
            DeregistrationProtection::EnabledWithoutCooldown
        };
        Ok(())
    }

    /// DisableImageDeregistrationProtection: protection enabled with a
    /// cooldown keeps holding for [`COOLDOWN`]; disabling what is already
    /// disabled changes nothing (and does not restart a cooldown).
    pub fn disable_deregistration_protection(&mut self, ctx: &Ctx, id: &str) -> ApiResult<()> {
        use DeregistrationProtection::{
            Disabled, DisabledUntil, EnabledWithCooldown, EnabledWithoutCooldown,
        };
        let now = ctx.now;
        let image = self.owned_image_mut(ctx, id)?;
        image.deregistration_protection = match image.deregistration_protection.at(now) {
            EnabledWithCooldown => DisabledUntil {
                until: now + COOLDOWN,
            },
            EnabledWithoutCooldown | Disabled => Disabled,
            running @ DisabledUntil { .. } => running,
        };
        Ok(())
    }
}
