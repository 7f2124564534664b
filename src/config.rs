//! The operator's settings: one struct from the command line to the
//! tracker. Each field is a flag of `ami-copy-operator run` (and an
//! environment variable), except the few that only tests change.

use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::policy::AmiCopyPolicySpec;

#[derive(Args, Clone, Debug)]
pub struct Config {
    /// How often to look at pending copies.
    #[arg(long, env = "AMICOPY_POLL_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// How often to re-check settled objects for drift.
    #[arg(long, env = "AMICOPY_RESYNC_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// First retry delay after a failed reconcile; doubles up to
    /// `max_backoff`.
    #[arg(skip = Duration::from_secs(1))]
    pub min_backoff: Duration,

    /// Longest wait before retrying an object whose reconcile failed (the
    /// wait doubles from 1 s after each failure in a row).
    #[arg(
        long = "max-retry-delay",
        env = "AMICOPY_MAX_RETRY_DELAY",
        default_value = "5m",
        value_parser = humantime::parse_duration
    )]
    pub max_backoff: Duration,

    /// `batched`: one tracker per region follows every pending copy in as few
    /// DescribeImages calls as EC2 allows and wakes the objects concerned;
    /// `per-object`: each object polls its own targets.
    #[arg(long, env = "AMICOPY_TRACKING", value_enum, default_value_t = Tracking::Batched)]
    pub tracking: Tracking,

    /// Copies in flight per destination region (batched tracking).
    #[arg(
        long = "copy-limit-per-region",
        env = "AMICOPY_COPY_LIMIT_PER_REGION",
        default_value_t = 50
    )]
    pub dest_copy_limit: usize,

    /// Copies in flight from one source region (batched tracking).
    #[arg(
        long = "copy-limit-per-source-region",
        env = "AMICOPY_COPY_LIMIT_PER_SOURCE_REGION",
        default_value_t = 25
    )]
    pub source_copy_limit: usize,

    /// How often a `source.selector` is resolved again.
    #[arg(long, env = "AMICOPY_SOURCE_REFRESH_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub source_refresh_interval: Duration,

    /// Let `sharing.public: true` make copies public (refused otherwise).
    #[arg(long, env = "AMICOPY_ALLOW_PUBLIC_IMAGES")]
    pub allow_public_images: bool,

    /// Reconciles running at once: bounds memory (each holds its EC2 calls'
    /// buffers) and the burst of calls to EC2 and the API server.
    #[arg(
        long = "max-concurrent-reconciles",
        env = "AMICOPY_MAX_CONCURRENT_RECONCILES",
        default_value_t = 16
    )]
    pub concurrency: u16,

    /// How long EC2 may take to list a new copy (and its tags): until then a
    /// copy missing from DescribeImages is looked for again, not taken as
    /// gone.
    #[arg(long, env = "AMICOPY_LISTING_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub listing_grace: Duration,

    /// The AmiCopyPolicy of namespaces no policy selects: the `spec` of an
    /// AmiCopyPolicy as JSON. The default, `{}`, allows same-account copies
    /// only (any region, keys of that account, nothing shared, no roles).
    #[arg(long, env = "AMICOPY_DEFAULT_POLICY", default_value = "{}", value_parser = parse_policy)]
    pub default_policy: AmiCopyPolicySpec,

    /// How often an older copy kept because something uses it is looked at
    /// again.
    #[arg(long, env = "AMICOPY_IN_USE_RECHECK_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub in_use_recheck_interval: Duration,

    /// Where `spec.publish.ssmParameter` may write: under this prefix
    /// followed by the object's namespace and `/` (by default
    /// `/amicopy/<namespace>/`), so that no namespace writes another's
    /// parameters. Keep the IAM policy's `ssm:` resource in line with it.
    #[arg(
        long,
        env = "AMICOPY_SSM_PARAMETER_PREFIX",
        default_value = "/amicopy/"
    )]
    pub ssm_parameter_prefix: String,

    /// How long a copy limit lowered by `ResourceLimitExceeded` stays lowered.
    #[arg(skip = Duration::from_secs(120))]
    pub limit_cooldown: Duration,
}

/// How the targets of pending copies are followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Tracking {
    Batched,
    PerObject,
}

impl Config {
    /// Whether one shared tracker follows every object's targets.
    pub fn batched(&self) -> bool {
        self.tracking == Tracking::Batched
    }
}

/// The defaults of the command line, so that there is one list of them.
fn parse_policy(json: &str) -> Result<AmiCopyPolicySpec, String> {
    serde_json::from_str(json).map_err(|e| format!("not the spec of an AmiCopyPolicy: {e}"))
}

impl Default for Config {
    fn default() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        Defaults::parse_from(["ami-copy-operator"]).config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_command_lines() {
        let c = Config::default();
        assert_eq!(c.poll_interval, Duration::from_secs(15));
        assert_eq!(c.resync_interval, Duration::from_secs(600));
        assert_eq!(c.max_backoff, Duration::from_secs(300));
        assert_eq!(c.min_backoff, Duration::from_secs(1));
        assert!(c.batched());
        assert_eq!((c.dest_copy_limit, c.source_copy_limit), (50, 25));
        assert_eq!(c.concurrency, 16);
        assert!(!c.allow_public_images);
        assert_eq!(c.default_policy, AmiCopyPolicySpec::default());
        assert_eq!(c.in_use_recheck_interval, Duration::from_secs(300));
        assert_eq!(c.ssm_parameter_prefix, "/amicopy/");
    }
}
