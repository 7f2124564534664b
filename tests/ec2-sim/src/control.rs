//! The control surface: the same operations from Rust and over HTTP JSON.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::actions::{self, Env};
use crate::config::{AccountRegion, SimConfig};
use crate::faults::{FaultRule, Faults, Verdict};
use crate::model::{Caller, Image, Instance, LaunchTemplate, SeedImage, Snapshot, State};
use crate::wire::{ApiResult, Params};

/// Calls counted per (action, region, outcome); outcome is `ok`, an error
/// code, or `dropped`; for a call whose action was applied and whose reply
/// a fault then lost, `applied:` and the error code, `applied:dropped`, or
/// `applied:delayed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCount {
    pub action: String,
    pub region: String,
    pub outcome: String,
    pub count: u64,
}

struct Inner {
    config: SimConfig,
    state: State,
    faults: Faults,
    calls: BTreeMap<(String, String, String), u64>,
    clock_offset: Duration,
    seed: u64,
}

/// Shared handle on a simulator's state, configuration and faults.
pub struct Control {
    inner: Mutex<Inner>,
}

impl Control {
    pub(crate) fn new(config: SimConfig) -> Self {
        let seed = config.seed.unwrap_or_else(rand::random);
        Self {
            inner: Mutex::new(Inner {
                state: State::new(seed),
                faults: Faults::new(seed),
                config,
                calls: BTreeMap::new(),
                clock_offset: Duration::ZERO,
                seed,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not wedge every later test request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(inner: &Inner) -> OffsetDateTime {
        OffsetDateTime::now_utc() + inner.clock_offset
    }

    pub fn config(&self) -> SimConfig {
        self.lock().config.clone()
    }

    pub fn update_config(&self, change: impl FnOnce(&mut SimConfig)) {
        change(&mut self.lock().config);
    }

    pub fn set_copy_duration(&self, duration: Duration) {
        self.update_config(|c| c.copy_duration = duration);
    }

    pub fn set_concurrent_copy_limit(&self, limit: usize) {
        self.update_config(|c| c.concurrent_copy_limit = limit);
    }

    /// See [`SimConfig::propagation_lag`].
    pub fn set_propagation_lag(&self, lag: Duration) {
        self.update_config(|c| c.propagation_lag = lag);
    }

    /// See [`SimConfig::deregistered_visibility`].
    pub fn set_deregistered_visibility(&self, visibility: Duration) {
        self.update_config(|c| c.deregistered_visibility = visibility);
    }

    pub fn set_encryption_by_default(&self, account: &str, region: &str, enabled: bool) {
        self.update_config(|c| {
            let entry = AccountRegion::new(account, region);
            c.encryption_by_default.retain(|e| *e != entry);
            if enabled {
                c.encryption_by_default.push(entry);
            }
        });
    }

    pub fn add_fault(&self, rule: FaultRule) {
        self.lock().faults.add(rule);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn faults(&self) -> Vec<FaultRule> {
        self.lock().faults.rules()
    }

    /// Adds an image directly, with whatever properties EC2 would not let
    /// a test create through the API. Returns its id.
    pub fn seed_image(&self, seed: SeedImage) -> String {
        let mut inner = self.lock();
        let now = Self::now(&inner);
        let Inner { config, state, .. } = &mut *inner;
        state.seed_image(config, seed, now)
    }

    pub fn image(&self, id: &str) -> Option<Image> {
        self.with_state(|s| s.images.get(id).cloned())
    }

    pub fn images(&self) -> Vec<Image> {
        self.with_state(|s| s.images.values().cloned().collect())
    }

    /// Copies running now, in every region and account.
    pub fn copies_running(&self) -> usize {
        self.with_state(|s| s.copies_running())
    }

    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.with_state(|s| s.snapshots.get(id).cloned())
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.with_state(|s| s.snapshots.values().cloned().collect())
    }

    /// Launch templates of every account and region, with their versions.
    pub fn launch_templates(&self) -> Vec<LaunchTemplate> {
        self.with_state(|s| s.launch_templates.values().cloned().collect())
    }

    /// Instances of every account and region, terminated ones included.
    pub fn instances(&self) -> Vec<Instance> {
        self.with_state(|s| s.instances.values().cloned().collect())
    }

    fn with_state<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        let mut inner = self.lock();
        let now = Self::now(&inner);
        inner.state.tick(now);
        read(&inner.state)
    }

    /// Moves the simulated clock forward; copies due by then complete.
    pub fn advance(&self, by: Duration) {
        let mut inner = self.lock();
        inner.clock_offset += by;
        let now = Self::now(&inner);
        inner.state.tick(now);
    }

    /// Completes every copy in flight at once.
    pub fn finish_copies(&self) {
        let mut inner = self.lock();
        let now = Self::now(&inner);
        inner.state.finish_copies(now);
    }

    pub fn calls(&self) -> Vec<CallCount> {
        self.lock()
            .calls
            .iter()
            .map(|((action, region, outcome), count)| CallCount {
                action: action.clone(),
                region: region.clone(),
                outcome: outcome.clone(),
                count: *count,
            })
            .collect()
    }

    /// Calls of `action` in `region`, whatever their outcome.
    pub fn call_count(&self, action: &str, region: &str) -> u64 {
        self.lock()
            .calls
            .iter()
            .filter(|((a, r, _), _)| a == action && r == region)
            .map(|(_, n)| n)
            .sum()
    }

    /// Forgets every resource, fault and call count; keeps the config.
    pub fn reset(&self) {
        let mut inner = self.lock();
        let seed = inner.seed;
        inner.state = State::new(seed);
        inner.faults = Faults::new(seed);
        inner.calls.clear();
        inner.clock_offset = Duration::ZERO;
    }

    pub(crate) fn record(&self, action: &str, region: &str, outcome: &str) {
        *self
            .lock()
            .calls
            .entry((action.to_string(), region.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    pub(crate) fn judge(&self, action: &str, region: &str) -> Verdict {
        self.lock().faults.judge(action, region, Instant::now())
    }

    pub(crate) fn judge_after(&self, action: &str, region: &str) -> Verdict {
        self.lock()
            .faults
            .judge_after(action, region, Instant::now())
    }

    pub(crate) fn execute(
        &self,
        action: &str,
        caller: &Caller,
        params: &Params,
        request_id: &str,
    ) -> ApiResult<String> {
        let mut inner = self.lock();
        let now = Self::now(&inner);
        let Inner {
            config,
            state,
            faults,
            ..
        } = &mut *inner;
        state.tick(now);
        let region = caller.region.clone();
        let mut copy_failure = || faults.copy_failure(&region, Instant::now());
        actions::dispatch(
            action,
            params,
            Env {
                config,
                state,
                caller,
                now,
                request_id,
                copy_failure: &mut copy_failure,
            },
        )
    }
}
