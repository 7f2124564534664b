//! When to look at an object again after a reconcile that went through.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::generations;
use crate::api::{AmiCopySpec, AmiCopyStatus, TargetState};
use crate::config::Config;
use crate::status::reason;

/// The wait before the next reconcile of an object whose status is `status`
/// (`busy`: something is in flight) at `now`.
pub fn after(
    config: &Config,
    spec: &AmiCopySpec,
    status: &AmiCopyStatus,
    busy: bool,
    now: &Time,
) -> Duration {
    // With the tracker, pending copies wake their object when they change;
    // only copies that have not started yet are looked at on a timer.
    let unstarted = status
        .destinations
        .iter()
        .any(|d| matches!(d.state, TargetState::Waiting | TargetState::Queued));
    // Retiring is the object's own work, step by step (name the snapshots,
    // deregister, delete what is left): no tracker wakes it for that.
    let retiring = status.retiring.iter().any(|r| r.used_by.is_empty());
    let next = if busy && (!config.batched() || unstarted || retiring) {
        config.poll_interval
    } else if config.batched() {
        // The tracker re-checks every target each drift period and wakes the
        // object on a change; this is only a safety net, so that thousands of
        // settled objects do not all wake up every period for nothing.
        config.resync_interval * 6
    } else {
        config.resync_interval
    };
    // A copy that may have started unseen is looked for once EC2 lists it;
    // so is a name refused a moment ago, which may be held by this object's
    // own copy that EC2 does not list yet.
    let name_held = |d: &&crate::api::TargetStatus| {
        d.reason.as_deref() == Some(reason::DUPLICATE_NAME)
            && super::recent(d.planned_at.as_deref(), now, config.listing_grace)
    };
    let unconfirmed = status.retiring.iter().any(generations::may_have_started)
        || status.destinations.iter().any(|d| name_held(&d));
    let next = if unconfirmed {
        next.min(config.listing_grace)
    } else {
        next
    };
    // A copy kept while something uses it is looked at again on its own
    // schedule, not at the pace of copies in flight.
    let next = if status.retiring.iter().any(|r| !r.used_by.is_empty()) {
        next.min(config.in_use_recheck_interval)
    } else {
        next
    };
    // A selector is resolved again on its own schedule.
    if spec.source.image_id.is_none() {
        next.min(config.source_refresh_interval)
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TargetStatus;
    use crate::config::Tracking;

    fn spec(selector: bool) -> AmiCopySpec {
        serde_json::from_value(serde_json::json!({
            "source": if selector {
                serde_json::json!({"region": "us-east-1", "selector": {"name": "golden-*"}})
            } else {
                serde_json::json!({"region": "us-east-1", "imageId": "ami-12345678"})
            },
            "destinations": [{"region": "eu-west-1"}],
        }))
        .unwrap()
    }

    fn status(state: TargetState) -> AmiCopyStatus {
        AmiCopyStatus {
            destinations: vec![TargetStatus {
                region: "eu-west-1".into(),
                state,
                ..TargetStatus::default()
            }],
            ..AmiCopyStatus::default()
        }
    }

    #[test]
    fn the_wait_follows_what_is_in_flight_and_how_it_is_tracked() {
        let secs = Duration::from_secs;
        let config = |tracking| Config {
            poll_interval: secs(15),
            resync_interval: secs(600),
            source_refresh_interval: secs(300),
            tracking,
            ..Config::default()
        };
        let (batched, alone) = (Tracking::Batched, Tracking::PerObject);
        // (tracking, state, busy, selector, wait)
        let cases = [
            (batched, TargetState::Pending, true, false, secs(3600)),
            (batched, TargetState::Queued, true, false, secs(15)),
            (batched, TargetState::Waiting, true, false, secs(15)),
            (batched, TargetState::Available, false, false, secs(3600)),
            (batched, TargetState::Available, false, true, secs(300)),
            (alone, TargetState::Pending, true, false, secs(15)),
            (alone, TargetState::Available, false, false, secs(600)),
            (alone, TargetState::Available, false, true, secs(300)),
            (alone, TargetState::Error, false, false, secs(600)),
        ];
        for (tracking, state, busy, selector, want) in cases {
            let got = after(
                &config(tracking),
                &spec(selector),
                &status(state.clone()),
                busy,
                &Time(k8s_openapi::jiff::Timestamp::now()),
            );
            assert_eq!(
                got, want,
                "{tracking:?} {state} busy={busy} selector={selector}"
            );
        }
    }

    #[test]
    fn an_older_copy_to_retire_is_looked_at_again_soon_even_when_batched() {
        let config = Config {
            poll_interval: Duration::from_secs(15),
            ..Config::default()
        };
        let mut st = status(TargetState::Available);
        st.retiring.push(TargetStatus {
            region: "eu-west-1".into(),
            image_id: Some("ami-00000000000000001".into()),
            ..TargetStatus::default()
        });
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        assert_eq!(
            after(&config, &spec(false), &st, true, &now),
            Duration::from_secs(15),
            "no tracker wakes it for the next step"
        );
        st.retiring[0].used_by = vec!["instance i-1 (running)".into()];
        assert_eq!(
            after(&config, &spec(false), &st, false, &now),
            config.in_use_recheck_interval,
            "kept in use: its own schedule"
        );
    }

    #[test]
    fn a_name_refused_a_moment_ago_is_looked_at_again_once_ec2_lists_new_copies() {
        let config = Config {
            resync_interval: Duration::from_secs(600),
            listing_grace: Duration::from_secs(60),
            ..Config::default()
        };
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
        let refused = |at: &str| AmiCopyStatus {
            destinations: vec![TargetStatus {
                region: "eu-west-1".into(),
                state: TargetState::Error,
                reason: Some(reason::DUPLICATE_NAME.into()),
                planned_at: Some(at.into()),
                ..TargetStatus::default()
            }],
            ..AmiCopyStatus::default()
        };
        let young = after(
            &config,
            &spec(false),
            &refused("2027-01-15T07:59:50Z"),
            false,
            &now,
        );
        assert_eq!(young, Duration::from_secs(60));
        let old = after(
            &config,
            &spec(false),
            &refused("2027-01-15T07:50:00Z"),
            false,
            &now,
        );
        assert!(old > Duration::from_secs(60), "{old:?}");
    }
}
