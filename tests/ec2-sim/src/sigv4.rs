//! Signature Version 4: the `Authorization` header of every EC2 request.

use crate::wire::{ApiError, ApiResult};

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The parts of a SigV4 `Authorization` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

fn incomplete(why: &str) -> ApiError {
    ApiError::with_status(403, "IncompleteSignature", why)
}

impl Authorization {
    pub fn parse(header: Option<&str>) -> ApiResult<Self> {
        let header = header.ok_or_else(|| {
            ApiError::with_status(
                401,
                "MissingAuthenticationToken",
                "Request is missing Authentication Token",
            )
        })?;
        let rest = header
            .strip_prefix(ALGORITHM)
            .filter(|r| r.starts_with(' '))
            .ok_or_else(|| incomplete("Unsupported or missing signature algorithm"))?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let (key, value) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| incomplete("Authorization header is not key=value pairs"))?;
            match key {
                "Credential" => credential = Some(value),
                "SignedHeaders" => signed = Some(value),
                "Signature" => signature = Some(value),
                _ => return Err(incomplete(&format!("Unknown authorization field {key}"))),
            }
        }
        let credential = credential.ok_or_else(|| incomplete("Missing Credential"))?;
        let signed = signed.ok_or_else(|| incomplete("Missing SignedHeaders"))?;
        let signature = signature.ok_or_else(|| incomplete("Missing Signature"))?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [key, date, region, service, "aws4_request"] = scope[..] else {
            return Err(incomplete(&format!(
                "Credential should be scoped to a valid region and service: {credential}"
            )));
        };
        if key.is_empty() || date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err(incomplete(&format!(
                "Malformed credential scope {credential}"
            )));
        }
        if service != "ec2" && service != "sts" {
            return Err(incomplete(&format!(
                "Credential should be scoped to correct service: 'ec2', not '{service}'"
            )));
        }
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(incomplete("Signature is not 64 hex digits"));
        }
        let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
        if !signed_headers.iter().any(|h| h == "host") {
            return Err(incomplete("The host header must be signed"));
        }
        Ok(Self {
            access_key_id: key.to_string(),
            date: date.to_string(),
            region: region.to_string(),
            service: service.to_string(),
            signed_headers,
            signature: signature.to_string(),
        })
    }

    /// Signs the same `POST /` request again with the given secret, with
    /// `aws-sigv4` (the signer the AWS SDK for Rust uses), over the headers
    /// the client signed, at the time it signed, and compares signatures.
    pub fn verify(
        &self,
        secret: &str,
        header: impl Fn(&str) -> Option<String>,
        body: &[u8],
    ) -> ApiResult<()> {
        let mismatch = || {
            ApiError::with_status(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        };
        let amz_date = header("x-amz-date").ok_or_else(mismatch)?;
        let format =
            time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        let time = time::PrimitiveDateTime::parse(&amz_date, &format)
            .map_err(|_| mismatch())?
            .assume_utc();
        let token = header("x-amz-security-token");
        // The signer adds x-amz-date (from the time) and the session token
        // (from the identity) itself.
        let mut signed = Vec::new();
        for name in &self.signed_headers {
            if name == "x-amz-date" || name == "x-amz-security-token" {
                continue;
            }
            let value = header(name).ok_or_else(mismatch)?;
            signed.push((name.clone(), value));
        }
        let host = header("host").ok_or_else(mismatch)?;
        let identity = aws_credential_types::Credentials::new(
            &self.access_key_id,
            secret,
            token,
            None,
            "ec2-sim",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(&self.service)
            .time(std::time::SystemTime::from(time))
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|_| mismatch())?
            .into();
        let request = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            format!("https://{host}/"),
            signed.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            aws_sigv4::http_request::SignableBody::Bytes(body),
        )
        .map_err(|_| mismatch())?;
        let output = aws_sigv4::http_request::sign(request, &params).map_err(|_| mismatch())?;
        if output.signature() == self.signature {
            Ok(())
        } else {
            Err(mismatch())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    const SIG: &str = "fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024";

    fn header(credential: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders=content-type;host;x-amz-date, Signature={SIG}"
        )
    }

    #[test]
    fn parses_the_credential_scope() {
        let auth = Authorization::parse(Some(&header("AKID/20250101/eu-west-1/ec2/aws4_request")))
            .unwrap();
        assert_eq!(auth.access_key_id, "AKID");
        assert_eq!(auth.region, "eu-west-1");
        assert_eq!(auth.signed_headers, ["content-type", "host", "x-amz-date"]);
    }

    #[test]
    fn rejects_missing_and_malformed_headers() {
        assert_eq!(
            Authorization::parse(None).unwrap_err().code,
            "MissingAuthenticationToken"
        );
        for bad in [
            "Bearer abc".to_string(),
            header("AKID/20250101/eu-west-1/s3/aws4_request"),
            header("AKID/2025/eu-west-1/ec2/aws4_request"),
            header("AKID/20250101/eu-west-1/ec2"),
        ] {
            assert_eq!(
                Authorization::parse(Some(&bad)).unwrap_err().code,
                "IncompleteSignature",
                "{bad}"
            );
        }
    }

    #[test]
    fn accepts_a_signature_derived_from_the_sigv4_specification() {
        let body = b"Action=DescribeImages&Version=2016-11-15";
        let headers = |name: &str| match name {
            "host" => Some("127.0.0.1:1".to_string()),
            "x-amz-date" => Some("20250101T000000Z".to_string()),
            "content-type" => Some("application/x-www-form-urlencoded".to_string()),
            _ => None,
        };
        let mut auth =
            Authorization::parse(Some(&header("AKID/20250101/us-east-1/ec2/aws4_request")))
                .unwrap();
        let err = auth.verify("secret", headers, body).unwrap_err();
        assert_eq!(err.code, "SignatureDoesNotMatch");
        // The expected signature, derived step by step as the SigV4 spec lays out.
        let canonical = format!(
            "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:127.0.0.1:1\nx-amz-date:20250101T000000Z\n\ncontent-type;host;x-amz-date\n{}",
            hex::encode(Sha256::digest(body))
        );
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n20250101T000000Z\n20250101/us-east-1/ec2/aws4_request\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(b"AWS4secret", b"20250101");
        for part in ["us-east-1", "ec2", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        auth.signature = hex::encode(hmac(&key, to_sign.as_bytes()));
        auth.verify("secret", headers, body).unwrap();
        assert!(auth.verify("other", headers, body).is_err());
        assert!(auth.verify("secret", headers, b"Action=X").is_err());
    }
}
