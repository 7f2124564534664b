//! Everything an object owns besides its current copies. Duplicates of the
//! current source are retired at once, and so is everything in regions no
//! longer listed; older generations stay until the current copy in their
//! region is available, then the newest `retain - 1` (and pinned ones) are
//! kept and the rest retired.

use std::collections::BTreeSet;

use super::destinations::target_status;
use super::upkeep::upkeep;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;

use super::{Action, Draft, Input, Retiring};
use crate::api::{DeletionPolicy, RetirementAction, SOURCE_TAG, TargetState, TargetStatus};
use crate::ec2::ImageInfo;
use crate::status::reason;

/// What becomes of an older copy.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Kept by `spec.retain` or pinned: a generation, kept in line.
    Keep(String),
    /// Retired (or released, with `Retain`) now.
    Retire(&'static str),
    /// Retired once the current copy of its region is available (and, with
    /// `spec.publish`, published).
    Wait(&'static str),
}

/// A copy EC2 reports as disabled.
fn disabled(img: &ImageInfo) -> bool {
    img.state.as_str() == "disabled"
}

/// Whether the copies of the current source are published, when the spec
/// publishes: until then consumers still read the older copies' IDs.
fn published(input: &Input) -> bool {
    input.spec.publish.is_none()
        || input
            .prev
            .published
            .as_ref()
            .is_some_and(|p| p.source_image_id == input.source_id)
}

/// The copies being retired and the generations kept.
pub fn plan(
    input: &Input,
    destinations: &[TargetStatus],
    draft: &mut Draft,
) -> (Vec<TargetStatus>, Vec<TargetStatus>) {
    let current: BTreeSet<&str> = destinations
        .iter()
        .filter_map(|d| d.image_id.as_deref())
        .collect();
    let mut retiring = Vec::new();
    let mut generations = Vec::new();
    for (&region, images) in &input.owned {
        let current_available = destinations
            .iter()
            .any(|d| d.region == region && d.state == TargetState::Available);
        // A disabled copy is retired already (peers that list disabled
        // images say so by its state).
        let mut older: Vec<&ImageInfo> = images
            .iter()
            .copied()
            .filter(|i| !current.contains(i.id.as_str()) && !disabled(i))
            .collect();
        // Newest first (EC2's creation dates sort as text).
        older.sort_by(|a, b| b.creation_date.cmp(&a.creation_date).then(a.id.cmp(&b.id)));
        let mut region_plan = Region {
            input,
            listed: input.spec.destinations.iter().any(|d| d.region == region),
            current_available,
            published: published(input),
            kept: 0,
        };
        for img in older {
            let mut ts = target_status(region, img, source_of(img), 0);
            if let Some(l) = input.last_entry(&img.id) {
                ts.shared_with = l.shared_with.clone();
                // What used it when last looked at: the Event is sent
                // when that changes, not at every look.
                ts.used_by = l.used_by.clone();
            }
            match region_plan.fate(img) {
                Fate::Keep(message) => {
                    ts.message = message;
                    ts.used_by.clear();
                    upkeep(input, region, img, &mut ts, &mut draft.actions);
                    generations.push(ts);
                }
                Fate::Retire(message) => {
                    // Still in use when last looked at: it says so until
                    // the look right before retiring it says otherwise.
                    ts.message = if ts.used_by.is_empty() {
                        message.into()
                    } else {
                        ts.reason = Some(reason::RETIREMENT_BLOCKED.into());
                        super::record::in_use(&ts.used_by)
                    };
                    // Written before the image is deregistered, so that its
                    // snapshots are still deleted if the operator stops
                    // between the two.
                    if input.spec.deletion_policy == DeletionPolicy::Delete {
                        ts.snapshots_to_delete = img
                            .snapshots
                            .iter()
                            .map(|s| s.id.clone())
                            .filter(|id| !input.source_snapshots.contains(id.as_str()))
                            .collect();
                    }
                    draft.actions.push(retire(input, region, img));
                    retiring.push(ts);
                }
                Fate::Wait(message) => {
                    ts.message = message.into();
                    retiring.push(ts);
                }
            }
        }
    }
    retiring.extend(leftovers(input, draft));
    let (kept_retiring, kept_generations) = unseen(input);
    retiring.extend(kept_retiring);
    generations.extend(kept_generations);
    (retiring, generations)
}

/// A copy decided on whose image ID never came back: CopyImage was sent, or
/// failed in a way that may have hidden its success (a lost reply).
pub fn may_have_started(t: &TargetStatus) -> bool {
    t.image_id.is_none() && matches!(t.state, TargetState::Pending | TargetState::Waiting)
}

/// Entries of the last status that this pass's listing cannot speak for,
/// kept so that their region stays of interest: every entry of a region EC2
/// did not answer about, and a copy of an earlier source, or in a region no
/// longer listed, that may have started without EC2 listing it yet (it lists
/// new copies late). The copies being retired, and the generations kept.
fn unseen(input: &Input) -> (Vec<TargetStatus>, Vec<TargetStatus>) {
    let listed = |region: &str| input.spec.destinations.iter().any(|d| d.region == region);
    let unreachable = |region: &str| input.observed.unreachable.contains_key(region);
    let grace = input.meta.listing_grace;
    let owned = |t: &TargetStatus| {
        t.image_id.as_ref().is_some_and(|id| {
            input
                .owned
                .get(t.region.as_str())
                .is_some_and(|imgs| imgs.iter().any(|i| &i.id == id))
        })
    };
    let unlisted_start = |t: &TargetStatus| {
        matches!(t.state, TargetState::Pending | TargetState::Waiting)
            && super::recent(t.planned_at.as_deref(), input.now, grace)
            && !owned(t)
    };
    // A destination's entry for the current source is the destination's
    // own; one for an earlier source, or a region no longer listed, is not.
    let current = |t: &TargetStatus| {
        listed(&t.region) && t.source_image_id.as_deref() == Some(input.source_id)
    };
    let retiring = input
        .prev
        .destinations
        .iter()
        .filter(|t| !current(t))
        .chain(&input.prev.retiring)
        .filter(|t| {
            unreachable(&t.region) || (t.snapshots_to_delete.is_empty() && unlisted_start(t))
        })
        .map(|t| TargetStatus {
            message: if unreachable(&t.region) {
                format!("EC2 in {} did not answer; kept until it does", t.region)
            } else {
                "looking for a copy that may have started: EC2 lists new copies late".into()
            },
            ..t.clone()
        })
        .collect();
    let generations = input
        .prev
        .generations
        .iter()
        .filter(|t| unreachable(&t.region))
        .cloned()
        .collect();
    (retiring, generations)
}

/// Deregistered copies whose snapshots are not all deleted yet: they stay
/// in the status, and their region of interest, until they are.
fn leftovers(input: &Input, draft: &mut Draft) -> Vec<TargetStatus> {
    let listed = |region: &str, id: &str| {
        input
            .owned
            .get(region)
            .is_some_and(|imgs| imgs.iter().any(|i| i.id == id))
    };
    let mut left = Vec::new();
    for t in &input.prev.retiring {
        let Some(id) = &t.image_id else { continue };
        let unreachable = input.observed.unreachable.contains_key(&t.region);
        if t.snapshots_to_delete.is_empty() || listed(&t.region, id) || unreachable {
            continue;
        }
        draft.actions.push(Action::DeleteSnapshots {
            region: t.region.clone(),
            image_id: id.clone(),
            snapshot_ids: t.snapshots_to_delete.clone(),
        });
        left.push(t.clone());
    }
    left
}

fn source_of(img: &ImageInfo) -> &str {
    img.tags.get(SOURCE_TAG).map(String::as_str).unwrap_or("")
}

/// The older copies of one region, newest first.
struct Region<'a> {
    input: &'a Input<'a>,
    listed: bool,
    current_available: bool,
    /// The current copies are published (or nothing is).
    published: bool,
    /// Generations kept so far by `spec.retain`.
    kept: usize,
}

impl Region<'_> {
    fn fate(&mut self, img: &ImageInfo) -> Fate {
        let input = self.input;
        let from = source_of(img);
        let duplicate = !input.source_id.is_empty() && from == input.source_id;
        let pinned = input.meta.pinned.contains(from);
        let keep_older = input.spec.retain.unwrap_or(1).saturating_sub(1) as usize;
        if self.listed && !duplicate && self.current_available && (pinned || self.kept < keep_older)
        {
            self.kept += usize::from(!pinned);
            return Fate::Keep(if pinned {
                format!("kept: its source {from} is pinned")
            } else {
                "kept by spec.retain".into()
            });
        }
        if duplicate {
            Fate::Retire("duplicate copy of the current source")
        } else if !self.listed {
            Fate::Retire("region removed from spec.destinations")
        } else if self.current_available && self.published {
            Fate::Retire("replaced by a copy of the current source")
        } else if self.current_available {
            Fate::Wait("kept until the copies of the current source are published")
        } else {
            Fate::Wait("kept until the copy of the current source is available")
        }
    }
}

/// Retire under `Delete`, release under `Retain`.
fn retire(input: &Input, region: &str, img: &ImageInfo) -> Action {
    let (region, image) = (region.to_owned(), img.clone());
    match input.spec.deletion_policy {
        DeletionPolicy::Delete => Action::Retire {
            region,
            image,
            how: retiring(input),
        },
        DeletionPolicy::Retain => Action::Release { region, image },
    }
}

/// How `spec.retirement` retires a copy at `input.now`.
pub fn retiring(input: &Input) -> Retiring {
    let spec = input.spec;
    let window = spec
        .retirement
        .as_ref()
        .and_then(|r| r.last_launched_within.as_deref())
        .and_then(|w| humantime::parse_duration(w).ok())
        .and_then(|w| SignedDuration::try_from(w).ok());
    Retiring {
        disable: spec.retirement_action() == RetirementAction::Disable,
        keep_in_use: spec.keeps_in_use(),
        launched_after: window
            .and_then(|w| input.now.0.checked_sub(w).ok())
            .map(|t| super::destinations::rfc3339(&Time(t))),
    }
}
