//! Whether the source can be copied at all, and if not, why: a problem of
//! the whole object rather than of one destination.

use super::{Meta, Observed, upkeep};
use crate::api::AmiCopySpec;
use crate::ec2::ImageInfo;
use crate::status::{self, reason};

/// The source image, when EC2 described it, and the object's problem.
pub struct Verdict<'a> {
    pub image: Option<&'a ImageInfo>,
    pub problem: Option<(&'static str, String)>,
}

pub fn assess<'a>(
    spec: &AmiCopySpec,
    meta: &Meta,
    observed: &'a Observed,
    source_id: &str,
) -> Verdict<'a> {
    let region = &spec.source.region;
    let (image, mut problem) = match &observed.source {
        _ if source_id.is_empty() => (
            None,
            Some((
                reason::SOURCE_NOT_FOUND,
                format!(
                    "no available AMI in {region} matches spec.source.selector: check its owners, name pattern and tags"
                ),
            )),
        ),
        Some(Ok(Some(img))) => (Some(img), None),
        Some(Ok(None)) => (
            None,
            Some((
                reason::SOURCE_NOT_FOUND,
                format!(
                    "source {source_id} not found in {region}: check spec.source, and that an AMI of another account is shared with this one"
                ),
            )),
        ),
        Some(Err(e)) if e.is_transient() => (None, None),
        Some(Err(e)) if status::region_refused(e) => (
            None,
            Some((
                reason::REGION_UNAVAILABLE,
                format!(
                    "EC2 in the source region {region} refused the operator (EC2 {}: {}): check spec.source.region and that the region is enabled for this account",
                    e.code, e.message
                ),
            )),
        ),
        Some(Err(e)) => (None, Some(status::copy_error(e))),
        None => (None, None),
    };
    if problem.is_none() && upkeep::wanted_grants(spec, meta).1 {
        problem = Some((
            reason::PUBLIC_NOT_ALLOWED,
            "sharing.public is set, but the operator does not make images public unless started with --allow-public-images; the other permissions are applied".into(),
        ));
    }
    Verdict { image, problem }
}
