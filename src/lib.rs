//! AmiCopy operator: copies Amazon Machine Images across AWS regions and keeps
//! the copies in step with their source.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod ec2;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod server;
pub mod status;

pub use api::{AmiCopy, AmiCopySpec, AmiCopyStatus};
pub use error::{Error, Result};

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&AmiCopy::crd()).expect("the CRD serializes to YAML")
}
