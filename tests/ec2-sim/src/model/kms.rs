//! KMS keys: how the key IDs, aliases and ARNs callers pass resolve to the
//! key ARNs EC2 records, and each account's default EBS key.

use sha2::{Digest, Sha256};

use crate::wire::{ApiError, ApiResult};

/// A stable, UUID-shaped key id derived from a name.
fn derived_key_id(seed: &str) -> String {
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The ARN of the AWS-managed `aws/ebs` key of an account in a region.
pub fn default_ebs_key(account: &str, region: &str) -> String {
    let id = derived_key_id(&format!("aws/ebs/{account}/{region}"));
    format!("arn:aws:kms:{region}:{account}:key/{id}")
}

/// Turns a key id, alias, key ARN or alias ARN into the key ARN EC2 records.
pub fn resolve_kms_key(key: &str, account: &str, region: &str) -> ApiResult<String> {
    let invalid = |why: &str| ApiError::invalid_value("KmsKeyId", key, why);
    let (key_region, key_account, resource) = match key.strip_prefix("arn:aws:kms:") {
        Some(rest) => {
            let parts: Vec<&str> = rest.splitn(3, ':').collect();
            let [r, a, res] = parts[..] else {
                return Err(invalid("Not a valid KMS key ARN."));
            };
            (r, a, res)
        }
        None => (region, account, key),
    };
    if key_region != region {
        return Err(ApiError::client(
            "InvalidParameterValue",
            format!(
                "KMS key {key} is in region {key_region}; a copy to {region} needs a key in {region}"
            ),
        ));
    }
    if let Some(alias) = resource.strip_prefix("alias/") {
        if alias == "aws/ebs" {
            return Ok(default_ebs_key(key_account, region));
        }
        let id = derived_key_id(&format!("{alias}/{key_account}/{region}"));
        return Ok(format!("arn:aws:kms:{region}:{key_account}:key/{id}"));
    }
    let id = resource.strip_prefix("key/").unwrap_or(resource);
    let uuid_like = id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let multi_region = id.starts_with("mrk-") && id.len() > 4;
    if !(uuid_like || multi_region) {
        return Err(invalid("Not a valid KMS key id, alias or ARN."));
    }
    Ok(format!("arn:aws:kms:{region}:{key_account}:key/{id}"))
}
