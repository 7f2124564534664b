//! Reliability: properties proved against the test bed with faults injected
//! on purpose (see docs/reliability.md). The operator runs as a separate
//! process, so that it can be killed and restarted, its memory measured, and
//! its SDK retry quota kept apart from the other tests' in-process operators.

mod bad_input;
mod chaos;
mod consistency;
mod crash;
mod deletion;
mod ec2_faults;
pub(crate) mod harness;
mod kube_faults;
mod soak;
