//! Injected misbehaviour: throttling, server errors, credential failures,
//! latency, dropped connections and failing copies; before the action, or
//! after it was applied with its reply lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::StateReason;
use crate::wire::ApiError;

/// What a rule does to the requests it hits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// HTTP 503 `RequestLimitExceeded`.
    Throttle,
    /// HTTP 500 `InternalError`.
    InternalError,
    /// HTTP 503 `Unavailable`.
    Unavailable,
    /// Delays the response; combines with any other rule.
    Latency {
        #[serde(with = "crate::config::millis")]
        delay: Duration,
    },
    /// Closes the connection without answering.
    DropConnection,
    /// HTTP 401 `AuthFailure`: EC2 could not validate the credentials.
    AuthFailure,
    /// HTTP 400 `RequestExpired`, EC2's answer when temporary credentials
    /// have expired ("Error codes for the Amazon EC2 API").
    ExpiredCredentials,
    /// Lets `CopyImage` succeed, then the copy ends `failed`.
    CopyFailure { code: String, message: String },
}

impl FaultKind {
    pub fn copy_failure() -> Self {
        Self::CopyFailure {
            code: "Server.InternalError".to_string(),
            message: "An internal error has occurred".to_string(),
        }
    }
}

/// When a rule fires among the requests it matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "when", rename_all = "snake_case")]
pub enum Trigger {
    Always,
    /// The next `count` matching requests.
    Next {
        count: u32,
    },
    /// Each matching request with this probability.
    Fraction {
        probability: f64,
    },
    /// A token bucket per region: requests beyond the rate are hit.
    RateLimit {
        per_second: f64,
        burst: u32,
    },
}

/// Whether a rule strikes before the action or after it was applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The request waits, or fails and its action never happens.
    #[default]
    Before,
    /// The action is applied and its reply lost: replaced by the failure,
    /// or held back by the latency. Only calls whose action succeeded are
    /// hit; `copy_failure` ignores the phase.
    After,
}

impl Phase {
    fn is_before(&self) -> bool {
        *self == Self::Before
    }
}

/// One fault: what, where (`None` = everywhere), when, and on which side
/// of the action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(flatten)]
    pub kind: FaultKind,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(flatten)]
    pub trigger: Trigger,
    /// Before the action (the default) or after it.
    // Left out of the JSON when `before`, so rules read as they always did.
    #[serde(default, skip_serializing_if = "Phase::is_before")]
    pub phase: Phase,
}

impl FaultRule {
    pub fn new(kind: FaultKind, trigger: Trigger) -> Self {
        Self {
            kind,
            region: None,
            action: None,
            trigger,
            phase: Phase::Before,
        }
    }

    /// Makes the rule strike after the action was applied, losing its reply.
    pub fn after_action(mut self) -> Self {
        self.phase = Phase::After;
        self
    }

    pub fn in_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    pub fn for_action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    fn matches(&self, action: &str, region: &str) -> bool {
        self.region.as_deref().is_none_or(|r| r == region)
            && self.action.as_deref().is_none_or(|a| a == action)
    }
}

/// What a request suffers: before its action, or in its reply after it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub delay: Duration,
    pub outcome: Option<Injected>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    Throttle,
    InternalError,
    Unavailable,
    Drop,
    AuthFailure,
    ExpiredCredentials,
}

impl Injected {
    /// The error EC2 answers with; `None` when there is no answer at all.
    pub fn error(self) -> Option<ApiError> {
        let (status, code, message) = match self {
            Self::Drop => return None,
            Self::Throttle => (503, "RequestLimitExceeded", "Request limit exceeded."),
            Self::InternalError => (500, "InternalError", "An internal error has occurred"),
            Self::Unavailable => (
                503,
                "Unavailable",
                "The server is overloaded or under maintenance.",
            ),
            Self::AuthFailure => (
                401,
                "AuthFailure",
                "AWS was not able to validate the provided access credentials",
            ),
            Self::ExpiredCredentials => (400, "RequestExpired", "Request has expired."),
        };
        Some(ApiError::with_status(status, code, message))
    }
}

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Active {
    rule: FaultRule,
    remaining: Option<u32>,
    buckets: HashMap<String, Bucket>,
}

/// The rules in force, applied in the order they were added.
pub struct Faults {
    rules: Vec<Active>,
    rng: StdRng,
}

impl Faults {
    pub fn new(seed: u64) -> Self {
        Self {
            rules: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_fa17),
        }
    }

    pub fn add(&mut self, rule: FaultRule) {
        let remaining = match rule.trigger {
            Trigger::Next { count } => Some(count),
            _ => None,
        };
        self.rules.push(Active {
            rule,
            remaining,
            buckets: HashMap::new(),
        });
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn rules(&self) -> Vec<FaultRule> {
        self.rules.iter().map(|a| a.rule.clone()).collect()
    }

    /// Decides the fate of a request before its action; every rule that
    /// matches is consulted so that latency adds up, and the first failure
    /// wins.
    pub fn judge(&mut self, action: &str, region: &str, now: Instant) -> Verdict {
        self.judge_phase(Phase::Before, action, region, now)
    }

    /// Decides, as `judge` does, what becomes of the reply of an action
    /// that was applied.
    pub fn judge_after(&mut self, action: &str, region: &str, now: Instant) -> Verdict {
        self.judge_phase(Phase::After, action, region, now)
    }

    fn judge_phase(&mut self, phase: Phase, action: &str, region: &str, now: Instant) -> Verdict {
        let mut verdict = Verdict::default();
        for i in 0..self.rules.len() {
            if self.rules[i].rule.phase != phase {
                continue;
            }
            let kind = self.rules[i].rule.kind.clone();
            let injected = match kind {
                FaultKind::Throttle => Some(Injected::Throttle),
                FaultKind::InternalError => Some(Injected::InternalError),
                FaultKind::Unavailable => Some(Injected::Unavailable),
                FaultKind::DropConnection => Some(Injected::Drop),
                FaultKind::AuthFailure => Some(Injected::AuthFailure),
                FaultKind::ExpiredCredentials => Some(Injected::ExpiredCredentials),
                FaultKind::Latency { .. } => None,
                FaultKind::CopyFailure { .. } => continue,
            };
            if injected.is_some() && verdict.outcome.is_some() {
                continue;
            }
            if !self.rules[i].rule.matches(action, region) || !self.fires(i, region, now) {
                continue;
            }
            match kind {
                FaultKind::Latency { delay } => verdict.delay += delay,
                _ => verdict.outcome = injected,
            }
        }
        verdict
    }

    /// Whether a copy starting now in `region` is to fail, and why.
    pub fn copy_failure(&mut self, region: &str, now: Instant) -> Option<StateReason> {
        for i in 0..self.rules.len() {
            let FaultKind::CopyFailure { code, message } = self.rules[i].rule.kind.clone() else {
                continue;
            };
            if self.rules[i].rule.matches("CopyImage", region) && self.fires(i, region, now) {
                return Some(StateReason { code, message });
            }
        }
        None
    }

    fn fires(&mut self, i: usize, region: &str, now: Instant) -> bool {
        let active = &mut self.rules[i];
        match active.rule.trigger {
            Trigger::Always => true,
            Trigger::Next { .. } => match &mut active.remaining {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            },
            Trigger::Fraction { probability } => self.rng.random_bool(probability.clamp(0.0, 1.0)),
            Trigger::RateLimit { per_second, burst } => {
                let bucket = active.buckets.entry(region.to_string()).or_insert(Bucket {
                    tokens: f64::from(burst),
                    at: now,
                });
                let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * per_second).min(f64::from(burst));
                bucket.at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    false
                } else {
                    true
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_n_fires_exactly_n_times_in_scope() {
        let mut faults = Faults::new(1);
        faults.add(
            FaultRule::new(FaultKind::Throttle, Trigger::Next { count: 2 })
                .in_region("eu-west-1")
                .for_action("CopyImage"),
        );
        let now = Instant::now();
        assert_eq!(faults.judge("CopyImage", "us-east-1", now).outcome, None);
        assert_eq!(
            faults.judge("DescribeImages", "eu-west-1", now).outcome,
            None
        );
        for _ in 0..2 {
            assert_eq!(
                faults.judge("CopyImage", "eu-west-1", now).outcome,
                Some(Injected::Throttle)
            );
        }
        assert_eq!(faults.judge("CopyImage", "eu-west-1", now).outcome, None);
    }

    #[test]
    fn latency_adds_up_and_first_failure_wins() {
        let mut faults = Faults::new(1);
        let delay = Duration::from_millis(5);
        faults.add(FaultRule::new(
            FaultKind::Latency { delay },
            Trigger::Always,
        ));
        faults.add(FaultRule::new(FaultKind::Unavailable, Trigger::Always));
        faults.add(FaultRule::new(FaultKind::DropConnection, Trigger::Always));
        faults.add(FaultRule::new(
            FaultKind::Latency { delay },
            Trigger::Always,
        ));
        let verdict = faults.judge("DescribeImages", "us-east-1", Instant::now());
        assert_eq!(verdict.delay, delay * 2);
        assert_eq!(verdict.outcome, Some(Injected::Unavailable));
    }

    #[test]
    fn fractions_are_reproducible_with_a_seed() {
        let run = |seed| {
            let mut faults = Faults::new(seed);
            faults.add(FaultRule::new(
                FaultKind::Throttle,
                Trigger::Fraction { probability: 0.5 },
            ));
            (0..64)
                .map(|_| faults.judge("X", "r", Instant::now()).outcome.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let hits = run(7).into_iter().filter(|h| *h).count();
        assert!((16..=48).contains(&hits), "{hits}");
    }

    #[test]
    fn token_bucket_refills_per_region() {
        let mut faults = Faults::new(1);
        faults.add(FaultRule::new(
            FaultKind::Throttle,
            Trigger::RateLimit {
                per_second: 1.0,
                burst: 2,
            },
        ));
        let t0 = Instant::now();
        let hit = |f: &mut Faults, region, t| f.judge("X", region, t).outcome.is_some();
        assert!(!hit(&mut faults, "a", t0));
        assert!(!hit(&mut faults, "a", t0));
        assert!(hit(&mut faults, "a", t0));
        assert!(!hit(&mut faults, "b", t0), "each region has its own bucket");
        assert!(!hit(&mut faults, "a", t0 + Duration::from_secs(1)));
        assert!(hit(&mut faults, "a", t0 + Duration::from_secs(1)));
    }

    #[test]
    fn copy_failures_count_only_copies() {
        let mut faults = Faults::new(1);
        faults.add(
            FaultRule::new(FaultKind::copy_failure(), Trigger::Next { count: 1 })
                .in_region("eu-west-1"),
        );
        let now = Instant::now();
        assert_eq!(
            faults.judge("CopyImage", "eu-west-1", now),
            Verdict::default()
        );
        assert!(faults.copy_failure("us-east-1", now).is_none());
        let reason = faults.copy_failure("eu-west-1", now).unwrap();
        assert_eq!(reason.code, "Server.InternalError");
        assert!(faults.copy_failure("eu-west-1", now).is_none());
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rule = FaultRule::new(FaultKind::Throttle, Trigger::Next { count: 3 }).in_region("x");
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "throttle", "when": "next", "count": 3, "region": "x", "action": null})
        );
        assert_eq!(serde_json::from_value::<FaultRule>(json).unwrap(), rule);
    }

    #[test]
    fn after_rules_wait_for_the_applied_action() {
        let mut faults = Faults::new(1);
        faults.add(
            FaultRule::new(FaultKind::DropConnection, Trigger::Next { count: 1 })
                .for_action("CopyImage")
                .after_action(),
        );
        let now = Instant::now();
        assert_eq!(faults.judge("CopyImage", "r", now), Verdict::default());
        assert_eq!(
            faults.judge_after("CreateTags", "r", now),
            Verdict::default()
        );
        assert_eq!(
            faults.judge_after("CopyImage", "r", now).outcome,
            Some(Injected::Drop)
        );
        assert_eq!(
            faults.judge_after("CopyImage", "r", now),
            Verdict::default()
        );
    }

    #[test]
    fn the_phase_defaults_to_before_and_shows_only_when_after() {
        let before: FaultRule =
            serde_json::from_value(serde_json::json!({"kind": "internal_error", "when": "always"}))
                .unwrap();
        assert_eq!(before.phase, Phase::Before);
        let after = FaultRule::new(
            FaultKind::Latency {
                delay: Duration::from_secs(30),
            },
            Trigger::Always,
        )
        .after_action();
        let json = serde_json::to_value(&after).unwrap();
        assert_eq!(json["phase"], "after");
        assert_eq!(json["delay"], 30_000);
        assert_eq!(serde_json::from_value::<FaultRule>(json).unwrap(), after);
    }

    #[test]
    fn credential_faults_answer_as_ec2_does() {
        let mut faults = Faults::new(1);
        faults.add(FaultRule::new(
            FaultKind::AuthFailure,
            Trigger::Next { count: 1 },
        ));
        faults.add(FaultRule::new(
            FaultKind::ExpiredCredentials,
            Trigger::Next { count: 1 },
        ));
        let now = Instant::now();
        let first = faults.judge("DescribeImages", "r", now).outcome.unwrap();
        let error = first.error().unwrap();
        assert_eq!((error.status, error.code.as_str()), (401, "AuthFailure"));
        assert!(error.message.contains("not able to validate"));
        let second = faults.judge("DescribeImages", "r", now).outcome.unwrap();
        let error = second.error().unwrap();
        assert_eq!((error.status, error.code.as_str()), (400, "RequestExpired"));
        assert_eq!(Injected::Drop.error(), None);
        let kinds = serde_json::json!([{"kind": "auth_failure"}, {"kind": "expired_credentials"}]);
        let parsed: Vec<FaultKind> = serde_json::from_value(kinds).unwrap();
        assert_eq!(
            parsed,
            [FaultKind::AuthFailure, FaultKind::ExpiredCredentials]
        );
    }
}
