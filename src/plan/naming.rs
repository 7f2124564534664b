//! Names, tags and idempotency tokens of the copies.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::Meta;
use crate::api::{AmiCopySpec, MAX_NAME_BASE, OWNER_TAG, SOURCE_TAG, UID_TAG};

/// Tags every target image and snapshot carries: ownership plus the user's.
pub fn desired_tags(
    spec: &AmiCopySpec,
    meta: &Meta,
    source_image_id: &str,
) -> BTreeMap<String, String> {
    let mut tags = spec.tags.clone();
    tags.insert(
        OWNER_TAG.into(),
        format!("{}/{}", meta.namespace, meta.name),
    );
    tags.insert(UID_TAG.into(), meta.uid.clone());
    tags.insert(SOURCE_TAG.into(), source_image_id.into());
    tags
}

/// Target AMI name: `<base>-<source image ID>`. AMI names are unique per
/// region and account; the suffix keeps the copies of an old and a new source
/// apart while both exist.
pub fn target_name(base: &str, source_image_id: &str) -> String {
    let base: String = base.chars().take(MAX_NAME_BASE).collect();
    format!("{base}-{source_image_id}")
}

/// The idempotency token of a copy: the same object, region, source,
/// encryption and attempt always yield the same token, so a retry after a
/// crash or a lost response returns the copy already started.
pub fn client_token(
    uid: &str,
    region: &str,
    source_region: &str,
    source_image_id: &str,
    encrypted: Option<bool>,
    kms: Option<&str>,
    attempt: u32,
) -> String {
    let mut h = Sha256::new();
    for part in [
        uid,
        region,
        source_region,
        source_image_id,
        &format!("{encrypted:?}"),
        kms.unwrap_or(""),
        &attempt.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}
