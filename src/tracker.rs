//! Batched tracking of target images and copy admission, shared by every
//! object.
//!
//! Instead of each object polling its own targets, one loop asks EC2 about
//! all pending targets of a region in as few `DescribeImages` calls as EC2
//! allows ([`MAX_IDS_PER_CALL`] IDs each), and wakes exactly the objects whose
//! targets changed. Settled targets are re-checked (drift: deregistered out
//! of band) the same way at a slower interval. Reconciles read this cache, so
//! a settled object costs no EC2 call of its own.
//!
//! Copy admission: at most `dest_limit` copies in flight per destination
//! region and `source_limit` per source region, across all objects. A copy
//! that finds no slot is `queued`; its object is woken when a slot frees.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, stream};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::api::AmiCopy;
use crate::api::TargetState;
use crate::config::Config;
use crate::ec2::{Ec2, Ec2Error, ImageInfo, MAX_IDS_PER_CALL, Scope};
use crate::metrics::Metrics;

/// DescribeImages calls of one round in flight at once.
const CALLS_AT_ONCE: usize = 4;

struct Entry {
    // Boxed: the map holds its entries inline, with room to spare.
    info: Option<Box<Compact>>,
    /// Seen in a DescribeImages answer at least once.
    seen: bool,
    /// The operator tagged it (the peer left it untagged on creation).
    self_tagged: bool,
    since: Instant,
    source_region: Arc<str>,
    // Almost always one object: a Vec made for one is a fraction of the
    // memory of a set, and there are tens of thousands of entries.
    watchers: Vec<Arc<ObjectRef<AmiCopy>>>,
}

/// What the planner reads of a target, in as little memory as it takes:
/// tens of thousands are kept. EC2's description of an image holds much
/// more (owner, device and virtualization types, ...) that only a source
/// needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Compact {
    state: TargetState,
    state_reason: Option<Box<str>>,
    name: Option<Box<str>>,
    // The copies of one object carry the same tags: one set for all.
    tags: Tags,
    snapshots: Box<[Snapshot]>,
    creation_date: Option<Box<str>>,
    deprecation_time: Option<Box<str>>,
    source_image_id: Option<Box<str>>,
    deregistration_protection: Option<Box<str>>,
}

/// A snapshot of a target: its ID, whether it is encrypted, its KMS key.
type Snapshot = (Box<str>, bool, Option<Box<str>>);

/// An image's tags, in key order.
type Tags = Arc<[(Box<str>, Box<str>)]>;

/// Values that many entries hold alike, each kept once: the objects that
/// watch targets (each has several), the tag sets of their copies, source
/// regions. A value no entry holds any more goes at the next [`purge`].
///
/// [`purge`]: Shared::purge
#[derive(Default)]
struct Shared {
    objects: HashSet<Arc<ObjectRef<AmiCopy>>>,
    tags: HashSet<Tags>,
    regions: HashSet<Arc<str>>,
}

impl Shared {
    fn object(&mut self, o: &ObjectRef<AmiCopy>) -> Arc<ObjectRef<AmiCopy>> {
        if let Some(shared) = self.objects.get(o) {
            return shared.clone();
        }
        let shared = Arc::new(o.clone());
        self.objects.insert(shared.clone());
        shared
    }

    fn tags(&mut self, tags: BTreeMap<String, String>) -> Tags {
        let tags: Vec<(Box<str>, Box<str>)> = tags
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        if let Some(shared) = self.tags.get(tags.as_slice()) {
            return shared.clone();
        }
        let shared: Tags = tags.into();
        self.tags.insert(shared.clone());
        shared
    }

    fn region(&mut self, region: &str) -> Arc<str> {
        if let Some(shared) = self.regions.get(region) {
            return shared.clone();
        }
        let shared: Arc<str> = region.into();
        self.regions.insert(shared.clone());
        shared
    }

    /// Lets go of what only this cache still holds.
    fn purge(&mut self) {
        self.objects.retain(|o| Arc::strong_count(o) > 1);
        self.tags.retain(|t| Arc::strong_count(t) > 1);
        self.regions.retain(|r| Arc::strong_count(r) > 1);
    }
}

/// Whether a record keeps the name of image `i`: only an untagged copy's
/// name is ever read (to tell it is this object's), a tagged one's is not.
fn keeps_name(i: &ImageInfo) -> bool {
    !i.tags.contains_key(crate::api::UID_TAG)
}

impl Compact {
    fn new(i: ImageInfo, shared: &mut Shared) -> Self {
        let boxed = |s: Option<String>| s.map(String::into_boxed_str);
        let keep_name = keeps_name(&i);
        Self {
            state: i.state,
            state_reason: boxed(i.state_reason),
            name: boxed(i.name).filter(|_| keep_name),
            tags: shared.tags(i.tags),
            snapshots: i
                .snapshots
                .into_iter()
                .map(|s| (s.id.into_boxed_str(), s.encrypted, boxed(s.kms_key_id)))
                .collect(),
            creation_date: boxed(i.creation_date),
            deprecation_time: boxed(i.deprecation_time),
            source_image_id: boxed(i.source_image_id),
            deregistration_protection: boxed(i.deregistration_protection),
        }
    }

    /// Whether EC2's description `i` says nothing this record does not:
    /// a drift round finds most targets unchanged, and rebuilding their
    /// records (every string allocated again, the tag set looked up) was
    /// most of its cost beside reading the XML.
    fn describes(&self, i: &ImageInfo) -> bool {
        let same = |a: &Option<Box<str>>, b: &Option<String>| a.as_deref() == b.as_deref();
        let name = i.name.as_ref().filter(|_| keeps_name(i));
        self.state == i.state
            && same(&self.state_reason, &i.state_reason)
            && self.name.as_deref() == name.map(String::as_str)
            && self.tags.len() == i.tags.len()
            && self
                .tags
                .iter()
                .zip(&i.tags)
                .all(|((k, v), (k2, v2))| **k == **k2 && **v == **v2)
            && self.snapshots.len() == i.snapshots.len()
            && self
                .snapshots
                .iter()
                .zip(&i.snapshots)
                .all(|((id, encrypted, kms), s)| {
                    **id == s.id
                        && *encrypted == s.encrypted
                        && kms.as_deref() == s.kms_key_id.as_deref()
                })
            && same(&self.creation_date, &i.creation_date)
            && same(&self.deprecation_time, &i.deprecation_time)
            && same(&self.source_image_id, &i.source_image_id)
            && same(
                &self.deregistration_protection,
                &i.deregistration_protection,
            )
    }

    /// The image as the planner reads it.
    fn expand(&self, id: &str) -> ImageInfo {
        let string = |s: &Option<Box<str>>| s.as_deref().map(str::to_owned);
        ImageInfo {
            id: id.to_owned(),
            name: string(&self.name),
            state: self.state.clone(),
            state_reason: string(&self.state_reason),
            tags: self
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            snapshots: self
                .snapshots
                .iter()
                .map(|(id, encrypted, kms)| crate::ec2::SnapshotRef {
                    id: id.to_string(),
                    encrypted: *encrypted,
                    kms_key_id: string(kms),
                })
                .collect(),
            creation_date: string(&self.creation_date),
            deprecation_time: string(&self.deprecation_time),
            source_image_id: string(&self.source_image_id),
            deregistration_protection: string(&self.deregistration_protection),
            ..ImageInfo::default()
        }
    }
}

impl Entry {
    fn pending(&self) -> bool {
        self.info
            .as_ref()
            .is_some_and(|i| i.state == TargetState::Pending)
    }
}

#[derive(Default)]
struct Queue {
    order: VecDeque<ObjectRef<AmiCopy>>,
    members: HashSet<ObjectRef<AmiCopy>>,
}

impl Queue {
    fn push(&mut self, o: &ObjectRef<AmiCopy>) {
        if self.members.insert(o.clone()) {
            self.order.push_back(o.clone());
        }
    }

    fn remove(&mut self, o: &ObjectRef<AmiCopy>) {
        if self.members.remove(o) {
            self.order.retain(|x| x != o);
        }
    }

    fn pop(&mut self) -> Option<ObjectRef<AmiCopy>> {
        let o = self.order.pop_front()?;
        self.members.remove(&o);
        Some(o)
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// A source image as last read, when, and for whom.
struct Remembered {
    info: Option<ImageInfo>,
    at: Instant,
    readers: Vec<Arc<ObjectRef<AmiCopy>>>,
}

#[derive(Default)]
struct State {
    /// Targets by destination, then image ID.
    images: HashMap<Scope, HashMap<Box<str>, Entry>>,
    shared: Shared,
    /// Source images by source region and ID, with the objects that read
    /// them: a source no object reads any more is no longer refreshed.
    sources: HashMap<(String, String), Remembered>,
    /// Admitted copies whose CopyImage has not returned yet, per destination
    /// and per source region.
    reserved: HashMap<Scope, usize>,
    reserved_from: HashMap<String, usize>,
    /// Pending targets per destination and per source region, kept as
    /// `images` changes: admission reads them for every copy, and walking
    /// tens of thousands of entries each time made admission quadratic.
    pending: Pending,
    /// Lowered destination limits after `ResourceLimitExceeded`, and until when.
    lowered: HashMap<Scope, (usize, Instant)>,
    /// Objects with a queued copy, per destination region, first come first
    /// served.
    waiting: HashMap<Scope, Queue>,
    last_full: Option<Instant>,
}

impl State {
    fn entry(&self, scope: &Scope, id: &str) -> Option<&Entry> {
        self.images.get(scope).and_then(|m| m.get(id))
    }
}

#[derive(Default)]
struct Pending {
    to: HashMap<Scope, usize>,
    from: HashMap<Arc<str>, usize>,
}

impl Pending {
    /// Counts a change of `entry` in `scope`; `was`: it was pending before
    /// (false for a new entry).
    fn change(&mut self, scope: &Scope, was: bool, entry: &Entry) {
        match (was, entry.pending()) {
            (false, true) => {
                *self.to.entry(scope.clone()).or_default() += 1;
                *self.from.entry(entry.source_region.clone()).or_default() += 1;
            }
            (true, false) => self.remove(scope, &entry.source_region),
            _ => {}
        }
    }

    /// A pending entry left.
    fn remove(&mut self, scope: &Scope, source_region: &str) {
        if let Some(n) = self.to.get_mut(scope) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.from.get_mut(source_region) {
            *n = n.saturating_sub(1);
        }
    }

    fn to(&self, scope: &Scope) -> usize {
        self.to.get(scope).copied().unwrap_or(0)
    }

    fn from(&self, source_region: &str) -> usize {
        self.from.get(source_region).copied().unwrap_or(0)
    }
}

/// What the cache knows about an image.
// Short-lived return value: boxing the image would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Known {
    /// Not tracked: ask EC2.
    Unknown,
    /// Tracked; `None` when EC2 no longer has it.
    Image(Option<ImageInfo>),
}

/// Why a copy must wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub message: String,
}

pub struct Tracker {
    config: Config,
    state: Mutex<State>,
    wake: mpsc::UnboundedSender<ObjectRef<AmiCopy>>,
}

impl Tracker {
    /// The tracker and the stream of objects to reconcile again.
    pub fn new(config: Config) -> (Self, mpsc::UnboundedReceiver<ObjectRef<AmiCopy>>) {
        let (wake, rx) = mpsc::unbounded_channel();
        let tracker = Self {
            config,
            state: Mutex::default(),
            wake,
        };
        (tracker, rx)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("tracker lock")
    }

    pub fn lookup(&self, scope: &Scope, id: &str) -> Known {
        match self.state().entry(scope, id) {
            Some(e) => Known::Image(e.info.as_ref().map(|c| c.expand(id))),
            None => Known::Unknown,
        }
    }

    /// Tracks an image EC2 reported, for `watcher`.
    pub fn track(
        &self,
        watcher: &ObjectRef<AmiCopy>,
        scope: &Scope,
        info: ImageInfo,
        source_region: &str,
    ) {
        let mut st = self.state();
        upsert(&mut st, watcher, scope, info, source_region, true);
    }

    /// Tracks a copy CopyImage just started (EC2 may not list it yet) and
    /// turns its admission reservation into an in-flight copy.
    pub fn track_new(
        &self,
        watcher: &ObjectRef<AmiCopy>,
        scope: &Scope,
        info: ImageInfo,
        source_region: &str,
    ) {
        let mut st = self.state();
        unreserve(&mut st, scope, source_region);
        upsert(&mut st, watcher, scope, info, source_region, false);
    }

    /// The operator tagged this target itself: its snapshots need a claim.
    pub fn mark_tagged(&self, scope: &Scope, id: &str) {
        if let Some(e) = self
            .state()
            .images
            .get_mut(scope)
            .and_then(|m| m.get_mut(id))
        {
            e.self_tagged = true;
        }
    }

    /// Whether the operator tagged this target itself.
    pub fn tagged_by_operator(&self, scope: &Scope, id: &str) -> bool {
        self.state().entry(scope, id).is_some_and(|e| e.self_tagged)
    }

    pub fn untrack(&self, scope: &Scope, id: &str) {
        let mut st = self.state();
        if let Some(e) = st.images.get_mut(scope).and_then(|m| m.remove(id))
            && e.pending()
        {
            st.pending.remove(scope, &e.source_region);
        }
    }

    /// Forgets everything `watcher` tracks (the object is gone).
    pub fn forget(&self, watcher: &ObjectRef<AmiCopy>) {
        let mut st = self.state();
        let State {
            images, pending, ..
        } = &mut *st;
        for (scope, targets) in images.iter_mut() {
            targets.retain(|_, e| {
                e.watchers.retain(|w| **w != *watcher);
                let keep = !e.watchers.is_empty();
                if !keep && e.pending() {
                    pending.remove(scope, &e.source_region);
                }
                keep
            });
        }
        for q in st.waiting.values_mut() {
            q.remove(watcher);
        }
        st.sources.retain(|_, known| {
            known.readers.retain(|r| **r != *watcher);
            !known.readers.is_empty()
        });
    }

    /// A source image read within the last two drift periods.
    pub fn source(&self, region: &str, id: &str) -> Option<Option<ImageInfo>> {
        let st = self.state();
        let known = st.sources.get(&(region.to_owned(), id.to_owned()))?;
        // Drift rounds refresh remembered sources; two periods of slack.
        let fresh = known.at.elapsed() < self.config.resync_interval * 2
            && known
                .info
                .as_ref()
                .is_some_and(|i| i.state != TargetState::Pending);
        fresh.then(|| known.info.clone())
    }

    /// Remembers a source image `reader` read, to be refreshed in batches
    /// for as long as an object reads it.
    pub fn remember_source(
        &self,
        reader: &ObjectRef<AmiCopy>,
        region: &str,
        id: &str,
        info: Option<ImageInfo>,
    ) {
        let mut st = self.state();
        let reader = st.shared.object(reader);
        let known = st
            .sources
            .entry((region.to_owned(), id.to_owned()))
            .or_insert_with(|| Remembered {
                info: None,
                at: Instant::now(),
                readers: Vec::new(),
            });
        (known.info, known.at) = (info, Instant::now());
        if !known.readers.contains(&reader) {
            known.readers.push(reader);
        }
    }

    /// Reserves a copy slot, or says why the copy must wait (and wakes
    /// `watcher` when a slot in `dest` frees).
    pub fn admit(
        &self,
        watcher: &ObjectRef<AmiCopy>,
        dest: &Scope,
        source_region: &str,
    ) -> Result<(), Queued> {
        let mut st = self.state();
        let now = Instant::now();
        let limit = match st.lowered.get(dest) {
            Some((l, until)) if *until > now => *l,
            _ => self.config.dest_copy_limit,
        };
        let in_dest = st.pending.to(dest) + st.reserved.get(dest).copied().unwrap_or(0);
        let from_source = st.pending.from(source_region)
            + st.reserved_from.get(source_region).copied().unwrap_or(0);
        // The messages carry limits, not counts, so a queued object's
        // status does not change (and is not rewritten) as slots come and go.
        let refusal = if in_dest >= limit {
            Some(format!(
                "waiting for a copy slot: at most {limit} copies in flight to {dest}"
            ))
        } else if from_source >= self.config.source_copy_limit {
            Some(format!(
                "waiting for a copy slot: at most {} copies in flight from {source_region}",
                self.config.source_copy_limit
            ))
        } else {
            None
        };
        match refusal {
            Some(message) => {
                st.waiting.entry(dest.clone()).or_default().push(watcher);
                Err(Queued { message })
            }
            None => {
                *st.reserved.entry(dest.clone()).or_default() += 1;
                *st.reserved_from
                    .entry(source_region.to_owned())
                    .or_default() += 1;
                if let Some(q) = st.waiting.get_mut(dest) {
                    q.remove(watcher);
                }
                Ok(())
            }
        }
    }

    /// Returns a reservation whose CopyImage failed.
    pub fn release(&self, dest: &Scope, source_region: &str) {
        let mut st = self.state();
        unreserve(&mut st, dest, source_region);
        wake_waiting(&mut st, dest, 1, &self.wake);
    }

    /// EC2 said `ResourceLimitExceeded`: hold `dest` to what is in flight now
    /// for a while.
    pub fn lower_limit(&self, dest: &Scope) {
        let mut st = self.state();
        let in_dest = st.pending.to(dest).max(1);
        let until = Instant::now() + self.config.limit_cooldown;
        warn!(region = %dest, limit = in_dest, "EC2 copy quota reached; lowering the copy limit for a while");
        st.lowered.insert(dest.clone(), (in_dest, until));
    }

    /// Copies in flight and queued objects per region, for metrics and tests.
    pub fn load(&self) -> BTreeMap<Scope, (usize, usize)> {
        let st = self.state();
        let mut load: BTreeMap<Scope, (usize, usize)> = BTreeMap::new();
        for (scope, n) in &st.pending.to {
            load.entry(scope.clone()).or_default().0 += n;
        }
        for (scope, w) in &st.waiting {
            load.entry(scope.clone()).or_default().1 += w.len();
        }
        load
    }

    /// One round: every pending target (every target when `full`), in
    /// batches per region. Wakes the watchers of targets that changed.
    pub async fn refresh<E: Ec2>(
        &self,
        ec2: &E,
        metrics: &Metrics,
        full: bool,
    ) -> Result<(), Ec2Error> {
        let batches: Vec<(Scope, Vec<String>)> = {
            let st = self.state();
            let mut batches = Vec::new();
            for (scope, targets) in &st.images {
                let mut batch = Vec::new();
                for (id, e) in targets {
                    if full || e.pending() || !e.seen {
                        batch.push(id.to_string());
                        if batch.len() == MAX_IDS_PER_CALL {
                            batches.push((scope.clone(), std::mem::take(&mut batch)));
                        }
                    }
                }
                if !batch.is_empty() {
                    batches.push((scope.clone(), batch));
                }
            }
            batches
        };
        // A few calls at a time, each answer applied as it comes: every
        // answer holds up to 100 images, and all of them at once would be
        // megabytes of XML in memory (and a burst EC2 may throttle).
        let mut answers = stream::iter(batches)
            .map(|(region, ids)| async move {
                let found = ec2.describe_images_by_ids(&region, &ids).await;
                (region, ids, found)
            })
            .buffer_unordered(CALLS_AT_ONCE);
        let mut first_error = None;
        while let Some((region, ids, found)) = answers.next().await {
            match found {
                Ok(found) => self.apply(&region, &ids, found, metrics),
                Err(e) => {
                    warn!(%region, error = %e, "batched DescribeImages failed; retrying next round");
                    first_error.get_or_insert(e);
                }
            }
        }
        if full && let Err(e) = self.refresh_sources(ec2).await {
            first_error.get_or_insert(e);
        }
        for (scope, (in_flight, queued)) in self.load() {
            metrics.set_copy_load(&scope.to_string(), in_flight, queued);
        }
        self.state().shared.purge();
        first_error.map_or(Ok(()), Err)
    }

    /// Re-reads every remembered source image in batches, so that settled
    /// objects never describe their source themselves.
    async fn refresh_sources<E: Ec2>(&self, ec2: &E) -> Result<(), Ec2Error> {
        let mut by_region: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (region, id) in self.state().sources.keys() {
            by_region
                .entry(region.clone())
                .or_default()
                .push(id.clone());
        }
        for (region, ids) in by_region {
            let scope = Scope::region(region.as_str());
            for chunk in ids.chunks(MAX_IDS_PER_CALL) {
                let found = ec2.describe_images_by_ids(&scope, chunk).await?;
                let mut st = self.state();
                let now = Instant::now();
                for id in chunk {
                    let info = found.iter().find(|i| &i.id == id).cloned();
                    if let Some(known) = st.sources.get_mut(&(region.clone(), id.clone())) {
                        (known.info, known.at) = (info, now);
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&self, region: &Scope, asked: &[String], found: Vec<ImageInfo>, metrics: &Metrics) {
        let mut st = self.state();
        let State {
            images,
            pending,
            shared,
            ..
        } = &mut *st;
        let mut found: HashMap<String, ImageInfo> = found
            .into_iter()
            .map(|mut i| (std::mem::take(&mut i.id), i))
            .collect();
        let mut freed = 0;
        for id in asked {
            let grace = self.config.listing_grace;
            let Some(entry) = images.get_mut(region).and_then(|m| m.get_mut(id.as_str())) else {
                continue;
            };
            let was_pending = entry.pending();
            let was_seen = entry.seen;
            let before = match found.remove(id) {
                // As it was: nothing to record, nobody to wake.
                Some(info)
                    if entry.seen && entry.info.as_ref().is_some_and(|c| c.describes(&info)) =>
                {
                    continue;
                }
                Some(info) => {
                    entry.seen = true;
                    entry.info.replace(Box::new(Compact::new(info, shared)))
                }
                // Not listed yet: a new copy gets some time before it counts as gone.
                None if !entry.seen && entry.since.elapsed() < grace => continue,
                None => entry.info.take(),
            };
            pending.change(region, was_pending, entry);
            let (was, now) = (before.as_deref(), entry.info.as_deref());
            let new_state = now.map(|i| &i.state);
            // The first listing of a new copy replaces the placeholder made
            // when it started; only a new state is news then.
            let changed = was.map(|i| &i.state) != new_state
                || (was_seen && was.map(|i| &i.tags) != now.map(|i| &i.tags));
            if changed {
                debug!(%region, image = %id, state = ?new_state, "target changed");
                if was_pending && !entry.pending() {
                    freed += 1;
                    if entry
                        .info
                        .as_ref()
                        .is_some_and(|i| i.state == TargetState::Available)
                    {
                        metrics.copy_finished(&region.to_string(), entry.since.elapsed());
                    }
                }
                for w in &entry.watchers {
                    let _ = self.wake.send(w.as_ref().clone());
                }
            }
        }
        wake_waiting(&mut st, region, freed, &self.wake);
    }

    /// Runs rounds until `stop` resolves: pending targets every `interval`,
    /// all targets every `drift_interval`.
    pub async fn run<E: Ec2>(&self, ec2: &E, metrics: &Metrics, stop: impl Future<Output = ()>) {
        let rounds = async {
            let mut tick = tokio::time::interval(self.config.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let full = {
                    let mut st = self.state();
                    let due = st
                        .last_full
                        .is_none_or(|t| t.elapsed() >= self.config.resync_interval);
                    if due {
                        st.last_full = Some(Instant::now());
                    }
                    due
                };
                let _ = self.refresh(ec2, metrics, full).await;
            }
        };
        tokio::select! {
            _ = rounds => {},
            _ = stop => {},
        }
    }
}

/// Adds `watcher` to the image's entry. `listed`: EC2 reported `info`, which
/// replaces what was known; otherwise `info` is a placeholder for a copy just
/// started and never overwrites what EC2 said.
fn upsert(
    st: &mut State,
    watcher: &ObjectRef<AmiCopy>,
    scope: &Scope,
    info: ImageInfo,
    source_region: &str,
    listed: bool,
) {
    if !st.images.contains_key(scope) {
        st.images.insert(scope.clone(), HashMap::new());
    }
    let State {
        images,
        shared,
        pending,
        ..
    } = st;
    let targets = images.get_mut(scope).expect("inserted above");
    if !targets.contains_key(info.id.as_str()) {
        let entry = Entry {
            info: None,
            seen: false,
            self_tagged: false,
            since: Instant::now(),
            source_region: shared.region(source_region),
            watchers: Vec::new(),
        };
        targets.insert(info.id.clone().into_boxed_str(), entry);
    }
    let entry = targets.get_mut(info.id.as_str()).expect("inserted above");
    let was_pending = entry.pending();
    if listed || entry.info.is_none() {
        entry.info = Some(Box::new(Compact::new(info, shared)));
    }
    pending.change(scope, was_pending, entry);
    entry.seen |= listed;
    if !entry.watchers.iter().any(|w| **w == *watcher) {
        entry.watchers.push(shared.object(watcher));
    }
}

fn unreserve(st: &mut State, dest: &Scope, source_region: &str) {
    if let Some(n) = st.reserved.get_mut(dest) {
        *n = n.saturating_sub(1);
    }
    if let Some(n) = st.reserved_from.get_mut(source_region) {
        *n = n.saturating_sub(1);
    }
}

/// Wakes the first `n` objects queued for `dest` (one per freed slot).
fn wake_waiting(
    st: &mut State,
    dest: &Scope,
    n: usize,
    wake: &mpsc::UnboundedSender<ObjectRef<AmiCopy>>,
) {
    if let Some(waiting) = st.waiting.get_mut(dest) {
        for _ in 0..n {
            match waiting.pop() {
                Some(w) => {
                    let _ = wake.send(w);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ec2::fake::FakeEc2;

    fn sc(region: &str) -> Scope {
        Scope::region(region)
    }

    fn obj(name: &str) -> ObjectRef<AmiCopy> {
        ObjectRef::new(name).within("ns")
    }

    fn image(id: &str, state: &str) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            state: state.into(),
            ..ImageInfo::default()
        }
    }

    fn tracker(
        dest_limit: usize,
        source_limit: usize,
    ) -> (Tracker, mpsc::UnboundedReceiver<ObjectRef<AmiCopy>>) {
        Tracker::new(Config {
            dest_copy_limit: dest_limit,
            source_copy_limit: source_limit,
            listing_grace: Duration::from_secs(3600),
            ..Config::default()
        })
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<ObjectRef<AmiCopy>>) -> Vec<String> {
        let mut woken = Vec::new();
        while let Ok(o) = rx.try_recv() {
            woken.push(o.name);
        }
        woken
    }

    #[tokio::test]
    async fn pending_targets_are_described_in_batches_of_100_per_region() {
        let (t, _rx) = tracker(1000, 1000);
        let ec2 = FakeEc2::default();
        for i in 0..250 {
            let id = format!("ami-{i:017x}");
            ec2.put("eu-west-1", image(&id, "pending"));
            t.track(
                &obj("a"),
                &sc("eu-west-1"),
                image(&id, "pending"),
                "us-east-1",
            );
        }
        for i in 0..3 {
            let id = format!("ami-{:017x}", 1000 + i);
            ec2.put("ap-south-1", image(&id, "available"));
            t.track(
                &obj("b"),
                &sc("ap-south-1"),
                image(&id, "available"),
                "us-east-1",
            );
        }
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        let calls = ec2.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![
                "DescribeImagesByIds eu-west-1 100",
                "DescribeImagesByIds eu-west-1 100",
                "DescribeImagesByIds eu-west-1 50"
            ],
            "settled targets are not described between drift rounds"
        );
        ec2.calls.lock().unwrap().clear();
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        assert_eq!(
            ec2.calls.lock().unwrap().len(),
            4,
            "a drift round covers every target"
        );
    }

    #[tokio::test]
    async fn the_first_listing_of_a_new_copy_wakes_only_on_a_new_state() {
        let (t, mut rx) = tracker(10, 10);
        let ec2 = FakeEc2::default();
        let id = "ami-00000000000000003";
        let tagged = |state: &str, value: &str| ImageInfo {
            tags: [("k".to_string(), value.to_string())].into(),
            ..image(id, state)
        };
        t.admit(&obj("new"), &sc("eu-west-1"), "us-east-1").unwrap();
        t.track_new(
            &obj("new"),
            &sc("eu-west-1"),
            image(id, "pending"),
            "us-east-1",
        );
        ec2.put("eu-west-1", tagged("pending", "a"));
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert!(drain(&mut rx).is_empty(), "still pending: nothing new");
        ec2.put("eu-west-1", tagged("pending", "b"));
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert_eq!(drain(&mut rx), ["new"], "a listed image's tags changed");
        ec2.put("eu-west-1", tagged("available", "b"));
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert_eq!(drain(&mut rx), ["new"]);
    }

    #[tokio::test]
    async fn only_the_watchers_of_changed_targets_are_woken() {
        let (t, mut rx) = tracker(10, 10);
        let ec2 = FakeEc2::default();
        ec2.put("eu-west-1", image("ami-00000000000000001", "available"));
        ec2.put("eu-west-1", image("ami-00000000000000002", "pending"));
        t.track(
            &obj("done"),
            &sc("eu-west-1"),
            image("ami-00000000000000001", "pending"),
            "us-east-1",
        );
        t.track(
            &obj("still"),
            &sc("eu-west-1"),
            image("ami-00000000000000002", "pending"),
            "us-east-1",
        );
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert_eq!(drain(&mut rx), vec!["done"]);
        assert_eq!(
            t.lookup(&sc("eu-west-1"), "ami-00000000000000001"),
            Known::Image(Some(image("ami-00000000000000001", "available")))
        );
        assert_eq!(
            t.lookup(&sc("eu-west-1"), "ami-00000000000000009"),
            Known::Unknown
        );

        // Deregistered out of band: seen at the next drift round.
        ec2.images.lock().unwrap().clear();
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        let mut woken = drain(&mut rx);
        woken.sort();
        assert_eq!(woken, vec!["done", "still"]);
        assert_eq!(
            t.lookup(&sc("eu-west-1"), "ami-00000000000000001"),
            Known::Image(None)
        );
    }

    #[tokio::test]
    async fn a_new_copy_not_listed_yet_is_not_taken_for_gone() {
        let (t, mut rx) = tracker(10, 10);
        let ec2 = FakeEc2::default();
        assert!(t.admit(&obj("a"), &sc("eu-west-1"), "us-east-1").is_ok());
        t.track_new(
            &obj("a"),
            &sc("eu-west-1"),
            image("ami-00000000000000001", "pending"),
            "us-east-1",
        );
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        assert_eq!(
            t.lookup(&sc("eu-west-1"), "ami-00000000000000001"),
            Known::Image(Some(image("ami-00000000000000001", "pending")))
        );
        assert!(drain(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn admission_limits_copies_and_wakes_the_queue_in_order() {
        let (t, mut rx) = tracker(2, 3);
        let ec2 = FakeEc2::default();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            assert!(t.admit(&obj(name), &sc("eu-west-1"), "us-east-1").is_ok());
            let id = format!("ami-{i:017x}");
            t.track_new(
                &obj(name),
                &sc("eu-west-1"),
                image(&id, "pending"),
                "us-east-1",
            );
            ec2.put("eu-west-1", image(&id, "pending"));
        }
        let q = t
            .admit(&obj("c"), &sc("eu-west-1"), "us-east-1")
            .unwrap_err();
        assert!(
            q.message
                .contains("at most 2 copies in flight to eu-west-1"),
            "{}",
            q.message
        );
        assert!(t.admit(&obj("d"), &sc("eu-west-1"), "us-east-1").is_err());
        // The source-region limit (3) spans destinations.
        assert!(t.admit(&obj("e"), &sc("ap-south-1"), "us-east-1").is_ok());
        let q = t
            .admit(&obj("f"), &sc("ap-south-1"), "us-east-1")
            .unwrap_err();
        assert!(q.message.contains("from us-east-1"), "{}", q.message);
        t.release(&sc("ap-south-1"), "us-east-1");
        assert_eq!(
            drain(&mut rx),
            vec!["f"],
            "a released slot wakes the first in line"
        );
        assert_eq!(t.load().get(&sc("eu-west-1")), Some(&(2, 2)));

        // One copy completes: one slot, the first queued object is woken.
        ec2.put("eu-west-1", image("ami-00000000000000000", "available"));
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert_eq!(drain(&mut rx), vec!["a", "c"]);
        assert!(t.admit(&obj("c"), &sc("eu-west-1"), "us-east-1").is_ok());
    }

    #[test]
    fn a_record_describes_only_the_image_it_was_made_from() {
        let mut shared = Shared::default();
        let full = ImageInfo {
            id: "ami-00000000000000001".into(),
            name: Some("golden-ami-1".into()),
            state: TargetState::Available,
            tags: [(crate::api::UID_TAG.to_owned(), "u-1".to_owned())].into(),
            snapshots: vec![crate::ec2::SnapshotRef {
                id: "snap-1".into(),
                encrypted: true,
                kms_key_id: Some("key-1".into()),
            }],
            creation_date: Some("2026-12-03T10:00:00Z".into()),
            ..ImageInfo::default()
        };
        let record = Compact::new(full.clone(), &mut shared);
        assert!(record.describes(&full));
        // A tagged image's name is not kept, and not compared.
        let renamed = ImageInfo {
            name: Some("other".into()),
            ..full.clone()
        };
        assert!(record.describes(&renamed));
        let changes: [fn(&mut ImageInfo); 7] = [
            |i| i.state = TargetState::Failed,
            |i| i.state_reason = Some("why".into()),
            |i| {
                i.tags.insert("team".into(), "images".into());
            },
            |i| i.snapshots[0].encrypted = false,
            |i| i.snapshots.clear(),
            |i| i.deprecation_time = Some("2027-01-01T00:00:00Z".into()),
            |i| i.deregistration_protection = Some("enabled".into()),
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut changed = full.clone();
            change(&mut changed);
            assert!(!record.describes(&changed), "change {n}");
        }
        let untagged = ImageInfo {
            tags: Default::default(),
            ..full
        };
        let record = Compact::new(untagged.clone(), &mut shared);
        assert!(!record.describes(&ImageInfo {
            name: Some("other".into()),
            ..untagged
        }));
    }

    /// Pending targets per destination, counted by walking every entry.
    fn recount(t: &Tracker) -> BTreeMap<Scope, usize> {
        let mut n = BTreeMap::new();
        for (scope, targets) in &t.state().images {
            let pending = targets.values().filter(|e| e.pending()).count();
            if pending > 0 {
                n.insert(scope.clone(), pending);
            }
        }
        n
    }

    fn counted(t: &Tracker) -> BTreeMap<Scope, usize> {
        t.state()
            .pending
            .to
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (s.clone(), *n))
            .collect()
    }

    #[tokio::test]
    async fn copy_slots_are_counted_as_targets_come_change_and_go() {
        let (t, _rx) = tracker(3, 10);
        let ec2 = FakeEc2::default();
        let id = |i: usize| format!("ami-{i:017x}");
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(t.admit(&obj(name), &sc("eu-west-1"), "us-east-1").is_ok());
            t.track_new(
                &obj(name),
                &sc("eu-west-1"),
                image(&id(i), "pending"),
                "us-east-1",
            );
            ec2.put("eu-west-1", image(&id(i), "pending"));
        }
        // Listed again as pending, and watched by a second object: still 3.
        t.track(
            &obj("d"),
            &sc("eu-west-1"),
            image(&id(0), "pending"),
            "us-east-1",
        );
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        assert_eq!(counted(&t), recount(&t));
        assert!(t.admit(&obj("e"), &sc("eu-west-1"), "us-east-1").is_err());

        // Finished, untracked, forgotten: each frees its slot once.
        ec2.put("eu-west-1", image(&id(0), "available"));
        t.refresh(&ec2, &Metrics::default(), false).await.unwrap();
        assert_eq!(counted(&t), recount(&t));
        t.untrack(&sc("eu-west-1"), &id(1));
        t.forget(&obj("c"));
        assert_eq!(counted(&t), recount(&t));
        assert!(counted(&t).is_empty(), "{:?}", counted(&t));
        assert_eq!(t.state().pending.from("us-east-1"), 0);
        for name in ["e", "f", "g"] {
            assert!(t.admit(&obj(name), &sc("eu-west-1"), "us-east-1").is_ok());
        }
    }

    #[tokio::test]
    async fn drift_rounds_refresh_remembered_sources_in_batches() {
        let (t, _rx) = tracker(10, 10);
        let ec2 = FakeEc2::default();
        for i in 0..150 {
            let id = format!("ami-{i:017x}");
            ec2.put("us-east-1", image(&id, "available"));
            t.remember_source(&obj("a"), "us-east-1", &id, Some(image(&id, "available")));
        }
        t.remember_source(
            &obj("b"),
            "us-east-1",
            "ami-0000000000000dead",
            Some(image("ami-0000000000000dead", "available")),
        );
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        assert_eq!(
            ec2.calls.lock().unwrap().len(),
            2,
            "151 sources in two calls"
        );
        assert_eq!(
            t.source("us-east-1", "ami-00000000000000000"),
            Some(Some(image("ami-00000000000000000", "available")))
        );
        assert_eq!(
            t.source("us-east-1", "ami-0000000000000dead"),
            None,
            "a vanished source is asked for again"
        );
        // A source no object reads any more is not refreshed.
        t.forget(&obj("a"));
        t.refresh(&ec2, &Metrics::default(), true).await.unwrap();
        assert_eq!(ec2.calls.lock().unwrap().len(), 3, "one call, for b's");
    }

    #[tokio::test]
    async fn copy_quota_from_ec2_lowers_the_limit_for_a_while() {
        let (t, _rx) = tracker(50, 50);
        assert!(t.admit(&obj("a"), &sc("eu-west-1"), "us-east-1").is_ok());
        t.track_new(
            &obj("a"),
            &sc("eu-west-1"),
            image("ami-00000000000000001", "pending"),
            "us-east-1",
        );
        t.lower_limit(&sc("eu-west-1"));
        let q = t
            .admit(&obj("b"), &sc("eu-west-1"), "us-east-1")
            .unwrap_err();
        assert!(q.message.contains("at most 1 copies"), "{}", q.message);
    }
}
