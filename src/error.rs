//! The operator's one error type and how each kind is handled.

use crate::ec2::{Ec2Error, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error(transparent)]
    Ec2(#[from] Ec2Error),

    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error("the object has no {0}")]
    MissingField(&'static str),

    #[error("the cached object does not read as an AmiCopy: {0}")]
    Unreadable(#[source] serde_json::Error),

    #[error("EC2 did not return {image} in {region} to this account just now; looking again")]
    Unconfirmed { region: String, image: String },

    #[error("cleanup not finished in {region}: {what}")]
    CleanupPending { region: String, what: String },

    #[error("the object changed since this pass read it; reading it again")]
    Stale,

    #[error(
        "paused (annotation amicopy.dev/paused is \"true\"): nothing is done until it is removed"
    )]
    Paused,
}

impl Error {
    /// Stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Ec2(e) => match e.kind {
                ErrorKind::Throttled => "ec2_throttled",
                ErrorKind::Transient => "ec2_transient",
                ErrorKind::NotFound => "ec2_not_found",
                ErrorKind::Rejected => "ec2_rejected",
                ErrorKind::Credentials => "ec2_credentials",
            },
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::MissingField(_) | Error::Unreadable(_) => "invalid_object",
            Error::CleanupPending { .. } => "cleanup_pending",
            Error::Unconfirmed { .. } => "unconfirmed",
            Error::Stale => "stale",
            Error::Paused => "paused",
        }
    }

    /// Retrying will not help: the object cannot be read as it is (no
    /// namespace, no UID, no name). It waits for a change instead.
    pub fn is_terminal(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::MissingField(_) | Error::Unreadable(_) | Error::Paused => true,
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.is_terminal(),
                F::UnnamedObject | F::InvalidFinalizer => true,
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => false,
            },
            Error::Kube(_)
            | Error::Ec2(_)
            | Error::CleanupPending { .. }
            | Error::Unconfirmed { .. }
            | Error::Stale => false,
        }
    }

    /// A fault that passes by itself (throttling, 5xx, timeouts, EC2's lag):
    /// retried without telling the user.
    pub fn is_passing(&self) -> bool {
        match self {
            Error::Ec2(e) => e.is_transient(),
            Error::CleanupPending { .. } | Error::Unconfirmed { .. } | Error::Stale => true,
            Error::Kube(_) => true,
            Error::Finalizer(_) | Error::MissingField(_) | Error::Unreadable(_) | Error::Paused => {
                false
            }
        }
    }

    /// Throttling asks for a longer pause than other transient faults.
    pub fn is_throttling(&self) -> bool {
        self.metric_label() == "ec2_throttled"
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
