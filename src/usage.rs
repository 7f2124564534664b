//! What uses the copies about to be retired, asked of EC2 in batches: the
//! look-ups of every reconcile that retires copies in the same region and
//! account within a short window share one call per kind (launch template
//! versions, instances), as the tracker's rounds share DescribeImages. A
//! fleet whose objects all move to a new source then costs a few calls per
//! region, not two per object and region.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::ec2::{Ec2, Ec2Error, Scope};

/// What uses each image of a region, or why EC2 could not say.
pub type Users = Result<BTreeMap<String, Vec<String>>, Ec2Error>;

/// How long the first look-up of a batch waits for others to join it.
pub const WINDOW: Duration = Duration::from_millis(250);

/// The batches being gathered, one per scope.
#[derive(Default)]
pub struct Lookups {
    open: Mutex<HashMap<Scope, Batch>>,
}

#[derive(Default)]
struct Batch {
    ids: BTreeSet<String>,
    waiting: Vec<oneshot::Sender<Users>>,
}

impl Lookups {
    /// What uses `ids` in `scope`: joins the batch being gathered there, or
    /// opens one, waits `window` for others, and asks EC2 for all of them.
    pub async fn users<E: Ec2>(
        &self,
        ec2: &E,
        scope: &Scope,
        ids: &[String],
        window: Duration,
    ) -> Users {
        let joined = {
            let mut open = self.open.lock().expect("lookups lock");
            match open.get_mut(scope) {
                Some(batch) => {
                    let (tx, rx) = oneshot::channel();
                    batch.ids.extend(ids.iter().cloned());
                    batch.waiting.push(tx);
                    Some(rx)
                }
                None => {
                    let batch = open.entry(scope.clone()).or_default();
                    batch.ids.extend(ids.iter().cloned());
                    None
                }
            }
        };
        if let Some(rx) = joined {
            // The batch's caller went away before asking: ask alone.
            return match rx.await {
                Ok(users) => only(users, ids),
                Err(_) => ec2.images_in_use(scope, ids).await,
            };
        }
        // Closed even if this future is dropped while it waits: those who
        // joined then see their sender dropped and ask alone.
        let guard = Close {
            lookups: self,
            scope,
        };
        tokio::time::sleep(window).await;
        let batch = guard.take();
        let all: Vec<String> = batch.ids.into_iter().collect();
        let users = ec2.images_in_use(scope, &all).await;
        for tx in batch.waiting {
            let _ = tx.send(users.clone());
        }
        only(users, ids)
    }
}

/// The answer for `ids` alone.
fn only(users: Users, ids: &[String]) -> Users {
    users.map(|mut found| {
        found.retain(|id, _| ids.contains(id));
        found
    })
}

/// Removes a scope's batch from the open ones, when taken or dropped.
struct Close<'a> {
    lookups: &'a Lookups,
    scope: &'a Scope,
}

impl Close<'_> {
    fn take(self) -> Batch {
        let batch = self
            .lookups
            .open
            .lock()
            .expect("lookups lock")
            .remove(self.scope)
            .unwrap_or_default();
        std::mem::forget(self);
        batch
    }
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        if let Ok(mut open) = self.lookups.open.lock() {
            open.remove(self.scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ec2::fake::FakeEc2;

    #[tokio::test]
    async fn look_ups_within_the_window_share_one_call_per_scope() {
        let ec2 = Arc::new(FakeEc2::default());
        ec2.users.lock().unwrap().insert(
            ("eu-west-1".into(), "ami-2".into()),
            vec!["instance i-1 (running)".into()],
        );
        let lookups = Arc::new(Lookups::default());
        let scope = Scope::region("eu-west-1");
        let ask = |ids: Vec<&str>| {
            let (ec2, lookups, scope) = (ec2.clone(), lookups.clone(), scope.clone());
            let ids: Vec<String> = ids.into_iter().map(String::from).collect();
            tokio::spawn(async move {
                lookups
                    .users(ec2.as_ref(), &scope, &ids, Duration::from_millis(100))
                    .await
            })
        };
        let first = ask(vec!["ami-1"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = ask(vec!["ami-2", "ami-3"]);
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(first.unwrap(), BTreeMap::new(), "ami-1: nothing uses it");
        assert_eq!(
            second.unwrap(),
            BTreeMap::from([("ami-2".into(), vec!["instance i-1 (running)".into()])])
        );
        let calls = ec2.calls.lock().unwrap().clone();
        assert_eq!(calls, vec!["ImagesInUse eu-west-1 3"], "one call for both");

        // A batch whose first caller went away: the others ask alone.
        let lookups = Lookups::default();
        let one = ["ami-1".to_string()];
        let gone = lookups.users(ec2.as_ref(), &scope, &one, Duration::from_secs(60));
        let abandoned = tokio::time::timeout(Duration::from_millis(20), gone).await;
        assert!(abandoned.is_err());
        let alone = lookups
            .users(ec2.as_ref(), &scope, &["ami-2".into()], Duration::ZERO)
            .await;
        assert_eq!(alone.unwrap().len(), 1);
    }
}
