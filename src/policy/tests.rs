//! The policy's rules, one table of cases shared with the admission test
//! (`tests/policy-cases.yaml`).
