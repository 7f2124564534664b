//! EC2's eventual consistency ("Eventual consistency in the Amazon EC2
//! API"): a new image or snapshot that other calls do not know yet, tag
//! filters that see a tag change late, and deregistered images that
//! DescribeImages still returns for a while (DescribeImages: "Recently
//! deregistered images appear in the returned results for a short
//! interval"). Every window is set by the configuration and measured on the
//! simulated clock, so tests step through it with `advance`.

use std::collections::BTreeSet;

use time::OffsetDateTime;

use super::images::{Image, ImageState};
use super::query::among;
use super::tags::Tags;
use super::{Ctx, State};

/// Tag changes made but not yet seen by tag filters.
#[derive(Clone, Debug)]
pub(super) struct LaggingTags {
    /// What tag filters see until the first change lands.
    before: Tags,
    /// Each change, oldest first: when tag filters see it, and the tags.
    changes: Vec<(OffsetDateTime, Tags)>,
}

/// A deregistered image that DescribeImages still returns until `until`.
#[derive(Clone, Debug)]
pub(super) struct Tombstone {
    until: OffsetDateTime,
    image: Image,
}

impl State {
    /// Keeps the resource `id`, just created, from every other call until
    /// the propagation lag has passed.
    pub(super) fn propagate(&mut self, ctx: &Ctx, id: &str) {
        let lag = ctx.config.propagation_lag;
        if !lag.is_zero() {
            self.propagating.insert(id.to_string(), ctx.now + lag);
        }
    }

    /// Whether calls know of the resource `id` by `now`.
    pub(super) fn propagated(&self, id: &str, now: OffsetDateTime) -> bool {
        self.propagating.get(id).is_none_or(|at| *at <= now)
    }

    /// Records that the tags of `id` went from `before` to `after`, for tag
    /// filters to see after the propagation lag.
    pub(super) fn lag_tags(&mut self, ctx: &Ctx, id: &str, before: &Tags, after: &Tags) {
        if before == after {
            return;
        }
        let lag = ctx.config.propagation_lag;
        let change = (ctx.now + lag, after.clone());
        match self.lagging_tags.get_mut(id) {
            // Even without a lag now, a change must supersede the ones
            // still in flight from when there was one.
            Some(lagging) => lagging.changes.push(change),
            None if !lag.is_zero() => {
                let lagging = LaggingTags {
                    before: before.clone(),
                    changes: vec![change],
                };
                self.lagging_tags.insert(id.to_string(), lagging);
            }
            None => {}
        }
    }

    /// The tags of `id` as tag filters see them at `now`, given the tags
    /// it carries.
    pub(super) fn filter_tags<'a>(
        &'a self,
        id: &str,
        current: &'a Tags,
        now: OffsetDateTime,
    ) -> &'a Tags {
        match self.lagging_tags.get(id) {
            None => current,
            Some(lagging) => lagging
                .changes
                .iter()
                .rev()
                .find(|(at, _)| *at <= now)
                .map_or(&lagging.before, |(_, tags)| tags),
        }
    }

    /// The resources whose tags tag filters may see otherwise than they
    /// are: a lookup by tag must consider them too.
    pub(super) fn tags_in_flight(&self) -> impl Iterator<Item = &str> {
        self.lagging_tags.keys().map(String::as_str)
    }

    /// Keeps a deregistered image describable, as `deregistered`, for the
    /// configured while.
    pub(super) fn bury(&mut self, ctx: &Ctx, mut image: Image) {
        let keep = ctx.config.deregistered_visibility;
        if keep.is_zero() {
            return;
        }
        image.state = ImageState::Deregistered;
        image.copy = None;
        let until = ctx.now + keep;
        self.tombstones
            .insert(image.id.clone(), Tombstone { until, image });
    }

    /// The deregistered images DescribeImages still returns at `now`, among
    /// `ids` (all when `None`).
    pub(super) fn recently_deregistered<'a: 'b, 'b>(
        &'a self,
        ids: Option<&'b BTreeSet<&'b str>>,
        now: OffsetDateTime,
    ) -> impl Iterator<Item = (&'a String, &'a Image)> + 'b {
        among(&self.tombstones, ids)
            .filter(move |(_, t)| t.until > now)
            .map(|(id, t)| (id, &t.image))
    }

    /// Forgets the differences that are over by `now`.
    pub(super) fn settle(&mut self, now: OffsetDateTime) {
        self.propagating.retain(|_, at| *at > now);
        // The newest change wins once it has landed, whatever came before.
        self.lagging_tags
            .retain(|_, l| l.changes.last().is_some_and(|(at, _)| *at > now));
        self.tombstones.retain(|_, t| t.until > now);
    }
}
