//! The one integration-test binary (aws-sdk-ec2 is linked once). Needs the
//! test bed: run it through `hack/test.sh`.

mod admission;
mod argocd;
mod chart;
mod conformance;
mod ec2peer;
mod kstatus;
mod leader;
mod lifecycle;
mod monitoring;
mod operator;
mod policy;
mod reliability;
mod rollout;
mod testbed;
