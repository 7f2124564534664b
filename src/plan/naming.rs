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

/// What a copy's idempotency token is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInputs<'a> {
    pub uid: &'a str,
    pub region: &'a str,
    pub source_region: &'a str,
    pub source_image_id: &'a str,
    pub encrypted: Option<bool>,
    pub kms: Option<&'a str>,
    /// Copies started after the target went missing.
    pub attempt: u32,
    /// The object's generation when this destination's copy was planned;
    /// `None` for copies planned before the status recorded it, whose
    /// tokens stay what they were.
    pub generation: Option<i64>,
}

/// The idempotency token of a copy: the same inputs always yield the same
/// token, so a retry after a crash or a lost response returns the copy
/// already started; a destination removed and added back (a later
/// generation) gets a fresh copy.
pub fn client_token(t: &TokenInputs) -> String {
    let mut h = Sha256::new();
    let encrypted = format!("{:?}", t.encrypted);
    let attempt = t.attempt.to_string();
    let mut parts = vec![
        t.uid,
        t.region,
        t.source_region,
        t.source_image_id,
        &encrypted,
        t.kms.unwrap_or(""),
        &attempt,
    ];
    let generation = t.generation.map(|g| g.to_string());
    parts.extend(generation.as_deref());
    for part in parts {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}
