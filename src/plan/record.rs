//! Folding what the actions did into the status the plan led to, and
//! summarizing it once: `available` and the conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{Note, Plan, Sharing};
use crate::api::{AmiCopyStatus, TargetState, TargetStatus};
use crate::ec2::{Ec2Error, ErrorKind, Grant};
use crate::status::{self, Summary, reason};

/// What one action did, as far as the status and the Events care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// What became of the copy to a destination.
    Copy { region: String, copy: Copied },
    /// The permissions of a copy are now `want`.
    Shared(Sharing),
    /// A copy is deprecated from `at`.
    Deprecated {
        region: String,
        image_id: String,
        at: String,
    },
    /// What became of an older copy.
    Retirement {
        region: String,
        image_id: String,
        step: Retirement,
    },
    /// Deregistration protection is on for a current copy.
    Protected { region: String, image_id: String },
    /// The publication is done; `None`: nothing is published any more.
    Published(Option<crate::api::Published>),
    /// The ConfigMap or a parameter belongs to someone else: nothing was
    /// published.
    PublishBlocked(String),
    /// Nothing the status shows (tags), or the action failed.
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copied {
    /// CopyImage returned the new image's ID.
    Started {
        image_id: String,
        source_image_id: String,
        /// When CopyImage returned: EC2 may take the listing grace from
        /// then on to list the copy. (The pass may have begun long before,
        /// behind slow calls to other regions.)
        at: Time,
    },
    /// No copy slot was free; the object is woken when one is.
    Queued(String),
    /// EC2 refused or failed the CopyImage call.
    Failed(Ec2Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retirement {
    /// Deregistered, and its snapshots deleted but for `snapshots_left`.
    Retired { snapshots_left: Vec<String> },
    /// The snapshots it left were deleted but for `left`.
    SnapshotsDeleted { left: Vec<String> },
    /// Not deregistered yet: EC2 showed snapshots the status did not name;
    /// they are named now, and the copy is retired in the next pass.
    Named { snapshots: Vec<String> },
    /// Left in place without the ownership tags.
    Released,
    /// A fresh read showed it is not this object's: left untouched.
    Foreign { why: String },
    /// Kept: something uses it (`users` says what).
    InUse { users: Vec<String> },
    /// Disabled (`retirement.action: Disable`): it keeps its snapshots.
    Disabled,
}

/// How a failed CopyImage is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFailure {
    /// EC2's quota of concurrent copies is reached: queue, and slow down.
    Quota,
    /// Throttling, 5xx, timeouts: wait and retry.
    Busy,
    /// No credentials for the destination's account: wait and retry; the
    /// next look at the region shows the problem.
    Credentials,
    /// EC2 refused this copy; it stays refused until the spec changes.
    Rejected,
    /// A copy was started with this idempotency token before, with other
    /// arguments (the tags changed since): that copy exists, and is looked
    /// for, not refused.
    TokenInUse,
}

impl CopyFailure {
    pub fn of(e: &Ec2Error) -> Self {
        match e.kind {
            ErrorKind::Throttled if e.code == "ResourceLimitExceeded" => CopyFailure::Quota,
            ErrorKind::Throttled | ErrorKind::Transient => CopyFailure::Busy,
            ErrorKind::Credentials => CopyFailure::Credentials,
            ErrorKind::Rejected if e.code == "IdempotentParameterMismatch" => {
                CopyFailure::TokenInUse
            }
            ErrorKind::NotFound | ErrorKind::Rejected => CopyFailure::Rejected,
        }
    }

    /// Whether the reconcile backs off: EC2 was busy, or its quota was
    /// reached and no tracker queues the copy for a free slot.
    pub fn backs_off(self, batched: bool) -> bool {
        match self {
            CopyFailure::Quota => !batched,
            CopyFailure::Busy | CopyFailure::Credentials | CopyFailure::TokenInUse => true,
            CopyFailure::Rejected => false,
        }
    }

    /// The destination's state, reason and message.
    pub fn entry(self, region: &str, e: &Ec2Error) -> (TargetState, &'static str, String) {
        match self {
            CopyFailure::Quota => (
                TargetState::Queued,
                reason::COPY_QUOTA,
                format!(
                    "EC2's copy quota in {region} is reached; the operator slows down and retries"
                ),
            ),
            CopyFailure::Busy => (
                TargetState::Waiting,
                reason::WAITING,
                format!("EC2 is busy ({}); retrying", e.code),
            ),
            CopyFailure::Credentials => {
                let (why, message) = status::copy_error(e);
                (TargetState::Waiting, why, message)
            }
            CopyFailure::Rejected => {
                let (why, message) = status::copy_error(e);
                (TargetState::Error, why, message)
            }
            CopyFailure::TokenInUse => (
                TargetState::Pending,
                reason::WAITING,
                format!(
                    "a copy to {region} was started earlier, before the tags changed; EC2 does not list it yet"
                ),
            ),
        }
    }
}

/// The status to write, the Events to publish, and whether anything is
/// still in flight.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub status: AmiCopyStatus,
    pub notes: Vec<Note>,
    pub busy: bool,
}

/// Folds `outcomes` into the plan's status and summarizes it.
pub fn record(plan: Plan, outcomes: Vec<Outcome>, previous: &[Condition], now: &Time) -> Recorded {
    let planned_busy = busy(&plan.status);
    let (mut status, mut notes) = (plan.status, plan.notes);
    let mut global = plan.global;
    for outcome in outcomes {
        if let Outcome::PublishBlocked(why) = &outcome {
            global.get_or_insert((reason::PUBLISH_CONFLICT, why.clone()));
        }
        notes.extend(fold(&mut status, outcome));
    }
    // The publication names every copy: one Event says they are available
    // and published, not one more per kind of news.
    if notes.iter().any(|n| n.reason == reason::PUBLISHED) {
        notes.retain(|n| n.reason != reason::COPY_AVAILABLE);
    }
    summarize(&mut status, global, previous, now);
    let busy = planned_busy || busy(&status);
    Recorded {
        status,
        notes,
        busy,
    }
}

/// One line per entry of a status, for debug logs: where each copy is, of
/// what, in what state, since when, and the snapshots it leaves.
pub fn outline(status: &AmiCopyStatus) -> String {
    let line = |kind: &str, t: &TargetStatus| {
        format!(
            "{kind} {} {} of {} {} at {} left {:?}",
            t.region,
            t.image_id.as_deref().unwrap_or("-"),
            t.source_image_id.as_deref().unwrap_or("-"),
            t.state,
            t.planned_at.as_deref().unwrap_or("-"),
            t.snapshots_to_delete,
        )
    };
    let destinations = status.destinations.iter().map(|t| line("current", t));
    let generations = status.generations.iter().map(|t| line("kept", t));
    let retiring = status.retiring.iter().map(|t| line("retiring", t));
    destinations
        .chain(generations)
        .chain(retiring)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Copies in flight, or older copies still to retire (but for those kept
/// while something uses them, looked at on their own schedule).
fn busy(status: &AmiCopyStatus) -> bool {
    status.destinations.iter().any(|d| d.state.is_underway())
        || status.retiring.iter().any(|r| r.used_by.is_empty())
}

/// One outcome into the status; the Event it is worth, if any.
fn fold(status: &mut AmiCopyStatus, outcome: Outcome) -> Option<Note> {
    match outcome {
        Outcome::Copy { region, copy } => fold_copy(status, &region, copy),
        Outcome::Shared(change) => {
            if let Some(t) = current_or_kept(status, &change.image_id) {
                t.shared_with = change.want.iter().map(Grant::key).collect();
            }
            let keys = |g: &[Grant]| g.iter().map(Grant::key).collect::<Vec<_>>();
            let message = format!(
                "{} in {}: permissions added {:?}, removed {:?}",
                change.image_id,
                change.region,
                keys(&change.add),
                keys(&change.remove)
            );
            Some(Note::normal(reason::SHARED, &change.region, message))
        }
        Outcome::Deprecated {
            region,
            image_id,
            at,
        } => {
            let message = format!("{image_id} in {region} is deprecated from {at}");
            if let Some(t) = current_or_kept(status, &image_id) {
                t.deprecation_time = Some(at);
            }
            Some(Note::normal(reason::DEPRECATED, &region, message))
        }
        Outcome::Retirement {
            region,
            image_id,
            step,
        } => fold_retirement(status, &region, &image_id, step),
        Outcome::Protected { region, image_id } => {
            if let Some(t) = current_or_kept(status, &image_id) {
                t.deregistration_protection = Some(crate::ec2::PROTECTION_ON.into());
            }
            let message = format!("{image_id} in {region} is protected from deregistration");
            Some(Note::normal(reason::PROTECTED, &region, message))
        }
        Outcome::Published(published) => {
            let note = published.as_ref().map(|p| {
                let ids: Vec<String> = p.images.iter().map(|(r, i)| format!("{r}={i}")).collect();
                let message = format!(
                    "published the copies of {}: {}",
                    p.source_image_id,
                    ids.join(", ")
                );
                Note::normal(reason::PUBLISHED, "", message)
            });
            status.published = published;
            note
        }
        Outcome::PublishBlocked(why) => Some(Note::warning(reason::PUBLISH_CONFLICT, "", why)),
        Outcome::Done => None,
    }
}

/// A copy started, queued or refused: the destination's entry.
fn fold_copy(status: &mut AmiCopyStatus, region: &str, copy: Copied) -> Option<Note> {
    let entry = destination(status, region)?;
    match copy {
        Copied::Started {
            image_id,
            source_image_id,
            at,
        } => {
            let message = format!("copying {source_image_id} to {region} as {image_id}");
            entry.image_id = Some(image_id);
            entry.planned_at = Some(super::destinations::rfc3339(&at));
            Some(Note::normal(reason::COPY_STARTED, region, message))
        }
        Copied::Queued(message) => {
            entry.state = TargetState::Queued;
            entry.reason = Some(reason::COPY_QUEUED.into());
            entry.message = message;
            None
        }
        Copied::Failed(error) => {
            let failure = CopyFailure::of(&error);
            let (state, why, message) = failure.entry(region, &error);
            (entry.state, entry.reason) = (state, Some(why.into()));
            entry.message = message.clone();
            let note = format!("{region}: {message}");
            (failure == CopyFailure::Rejected)
                .then(|| Note::warning(reason::COPY_REJECTED, region, note))
        }
    }
}

/// An older copy retired, released, cleared of its snapshots, or found not
/// to be this object's.
fn fold_retirement(
    status: &mut AmiCopyStatus,
    region: &str,
    image_id: &str,
    step: Retirement,
) -> Option<Note> {
    match step {
        Retirement::Retired { snapshots_left } => {
            let message = if snapshots_left.is_empty() {
                format!("deregistered {image_id} in {region} and deleted its snapshots")
            } else {
                format!("deregistered {image_id} in {region}; its snapshots are deleted next")
            };
            leave_snapshots(status, region, image_id, snapshots_left);
            Some(Note::normal(reason::DEREGISTERED, region, message))
        }
        Retirement::SnapshotsDeleted { left } => {
            leave_snapshots(status, region, image_id, left);
            None
        }
        Retirement::Named { snapshots } => {
            if let Some(entry) = status
                .retiring
                .iter_mut()
                .find(|t| t.region == region && t.image_id.as_deref() == Some(image_id))
            {
                entry.snapshots_to_delete = snapshots;
            }
            None
        }
        Retirement::Released => {
            forget(status, region, image_id);
            let message = format!("{image_id} in {region} is retained and no longer managed");
            Some(Note::normal(reason::RETAINED, region, message))
        }
        Retirement::Foreign { why } => {
            let message = format!("{image_id} in {region} is left untouched: {why}");
            Some(Note::warning(
                reason::FOREIGN_IMAGE_IGNORED,
                region,
                message,
            ))
        }
        Retirement::InUse { users } => {
            let entry = status
                .retiring
                .iter_mut()
                .find(|t| t.region == region && t.image_id.as_deref() == Some(image_id))?;
            // The Event once per change of what uses it, not every look.
            let news = entry.used_by != users;
            entry.reason = Some(reason::RETIREMENT_BLOCKED.into());
            entry.message = in_use(&users);
            entry.snapshots_to_delete.clear();
            entry.used_by = users;
            news.then(|| {
                let message = format!("{image_id} in {region} is {}", entry.message);
                Note::normal(reason::RETIREMENT_BLOCKED, region, message)
            })
        }
        Retirement::Disabled => {
            forget(status, region, image_id);
            let message = format!("disabled {image_id} in {region}; its snapshots are kept");
            Some(Note::normal(reason::DISABLED, region, message))
        }
    }
}

fn destination<'a>(status: &'a mut AmiCopyStatus, region: &str) -> Option<&'a mut TargetStatus> {
    status.destinations.iter_mut().find(|d| d.region == region)
}

/// The status entry of a current or kept copy.
fn current_or_kept<'a>(
    status: &'a mut AmiCopyStatus,
    image_id: &str,
) -> Option<&'a mut TargetStatus> {
    status
        .destinations
        .iter_mut()
        .chain(status.generations.iter_mut())
        .find(|t| t.image_id.as_deref() == Some(image_id))
}

/// A deregistered copy leaves the status once no snapshot of it is left to
/// delete; until then it stays among those retiring, with what is left.
fn leave_snapshots(status: &mut AmiCopyStatus, region: &str, image_id: &str, left: Vec<String>) {
    if left.is_empty() {
        return forget(status, region, image_id);
    }
    let entry = status
        .retiring
        .iter_mut()
        .find(|r| r.region == region && r.image_id.as_deref() == Some(image_id));
    if let Some(entry) = entry {
        entry.state = TargetState::Other("deregistered".into());
        entry.message = format!("deregistered; deleting its snapshots {}", left.join(", "));
        entry.snapshots_to_delete = left;
    }
}

/// What an older copy kept in use says.
pub fn in_use(users: &[String]) -> String {
    format!("kept while in use: {}", users.join(", "))
}

/// A retired or released copy leaves the status.
fn forget(status: &mut AmiCopyStatus, region: &str, image_id: &str) {
    status
        .retiring
        .retain(|r| !(r.region == region && r.image_id.as_deref() == Some(image_id)));
}

/// Fills in `available` and the conditions from the destination states.
pub fn summarize(
    status: &mut AmiCopyStatus,
    global: Option<(&'static str, String)>,
    previous: &[Condition],
    now: &Time,
) {
    let available = status
        .destinations
        .iter()
        .filter(|d| d.state == TargetState::Available)
        .count();
    status.available = Some(format!("{available}/{}", status.destinations.len()));
    let summary = Summary {
        destinations: &status.destinations,
        retiring: &status.retiring,
        global,
    };
    status.conditions = status::conditions(&summary, previous, status.observed_generation, now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_copyimage_error_leads_to_its_state_and_retry() {
        // (code, state, reason, backs off with a tracker, without one)
        let cases = [
            (
                "ResourceLimitExceeded",
                TargetState::Queued,
                reason::COPY_QUOTA,
                false,
                true,
            ),
            (
                "RequestLimitExceeded",
                TargetState::Waiting,
                reason::WAITING,
                true,
                true,
            ),
            (
                "InternalError",
                TargetState::Waiting,
                reason::WAITING,
                true,
                true,
            ),
            (
                "Dispatch",
                TargetState::Waiting,
                reason::WAITING,
                true,
                true,
            ),
            (
                "InvalidAMIName.Duplicate",
                TargetState::Error,
                reason::DUPLICATE_NAME,
                false,
                false,
            ),
            (
                "IdempotentParameterMismatch",
                TargetState::Pending,
                reason::WAITING,
                true,
                true,
            ),
            (
                "InvalidSnapshot.NotFound",
                TargetState::Error,
                reason::SNAPSHOT_NOT_SHARED,
                false,
                false,
            ),
            (
                "UnauthorizedOperation",
                TargetState::Error,
                reason::ACCESS_DENIED,
                false,
                false,
            ),
            (
                "KMSKeyNotAccessible",
                TargetState::Error,
                reason::INVALID_KMS_KEY,
                false,
                false,
            ),
        ];
        for (code, state, why, batched, alone) in cases {
            let e = Ec2Error::new(code, "message");
            let failure = CopyFailure::of(&e);
            let (s, r, m) = failure.entry("eu-west-1", &e);
            assert_eq!((s, r), (state, why), "{code}");
            assert!(!m.is_empty(), "{code}: a message says what to do");
            assert_eq!(failure.backs_off(true), batched, "{code} with a tracker");
            assert_eq!(failure.backs_off(false), alone, "{code} without a tracker");
        }
    }

    fn pending(region: &str) -> TargetStatus {
        TargetStatus {
            region: region.into(),
            state: TargetState::Pending,
            ..TargetStatus::default()
        }
    }

    fn planned() -> Plan {
        Plan {
            actions: Vec::new(),
            claims: Vec::new(),
            status: AmiCopyStatus {
                destinations: vec![pending("eu-west-1"), pending("us-west-2")],
                retiring: vec![TargetStatus {
                    image_id: Some("ami-0000000000000000a".into()),
                    ..pending("eu-west-1")
                }],
                ..AmiCopyStatus::default()
            },
            notes: Vec::new(),
            global: None,
        }
    }

    #[test]
    fn outcomes_fill_in_the_planned_status_and_say_so_in_notes() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
        let outcomes = vec![
            Outcome::Copy {
                region: "eu-west-1".into(),
                copy: Copied::Started {
                    image_id: "ami-00000000000000042".into(),
                    source_image_id: "ami-00000000000000001".into(),
                    at: Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_007).unwrap()),
                },
            },
            Outcome::Copy {
                region: "us-west-2".into(),
                copy: Copied::Failed(Ec2Error::new("InvalidAMIName.Duplicate", "taken")),
            },
            Outcome::Retirement {
                region: "eu-west-1".into(),
                image_id: "ami-0000000000000000a".into(),
                step: Retirement::Retired {
                    snapshots_left: Vec::new(),
                },
            },
        ];
        let r = record(planned(), outcomes, &[], &now);
        let [eu, us] = &r.status.destinations[..] else {
            panic!("two destinations: {:?}", r.status.destinations)
        };
        assert_eq!(eu.image_id.as_deref(), Some("ami-00000000000000042"));
        assert_eq!(
            eu.planned_at.as_deref(),
            Some("2027-01-15T08:00:07Z"),
            "dated when EC2 returned the copy, not when the pass began"
        );
        assert_eq!(eu.state, TargetState::Pending);
        assert_eq!(us.state, TargetState::Error);
        assert_eq!(us.reason.as_deref(), Some(reason::DUPLICATE_NAME));
        assert!(r.status.retiring.is_empty(), "the retired copy leaves");
        let reasons: Vec<&str> = r.notes.iter().map(|n| n.reason).collect();
        assert_eq!(
            reasons,
            [
                reason::COPY_STARTED,
                reason::COPY_REJECTED,
                reason::DEREGISTERED
            ]
        );
        assert_eq!(r.status.available.as_deref(), Some("0/2"));
        assert_eq!(r.status.conditions.len(), 5, "summarized once, at the end");
        assert!(r.busy, "a copy is pending");

        // A snapshot that could not be deleted keeps the copy in the status.
        let left = record(
            planned(),
            vec![Outcome::Retirement {
                region: "eu-west-1".into(),
                image_id: "ami-0000000000000000a".into(),
                step: Retirement::Retired {
                    snapshots_left: vec!["snap-left".into()],
                },
            }],
            &[],
            &now,
        );
        let [kept] = &left.status.retiring[..] else {
            panic!("{:?}", left.status.retiring)
        };
        assert_eq!(kept.snapshots_to_delete, ["snap-left"]);
        assert_eq!(kept.state, TargetState::Other("deregistered".into()));
    }
}
