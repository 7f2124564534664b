//! Leader election on a coordination.k8s.io Lease, so that several replicas
//! are safe: only the holder of the lease reconciles; when it stops renewing
//! (it died, or lost the API server), another replica takes over once the
//! lease expires.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

/// Which Lease to hold, and for how long without renewal.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// A leader that has not renewed for this long is replaced.
    pub duration: Duration,
}

/// Runs `lead` whenever this replica holds the lease, until `shutdown` flips
/// to true. `lead` gets a future that resolves when leadership is lost (or on
/// shutdown) and must stop its work then. The lease is released on shutdown
/// so that another replica takes over at once.
pub async fn run<F, Fut>(
    client: Client,
    config: LeaseConfig,
    mut shutdown: watch::Receiver<bool>,
    mut lead: F,
) -> kube_lease_manager::Result<()>
where
    F: FnMut(LostLeadership) -> Fut,
    Fut: Future<Output = ()>,
{
    let secs = config.duration.as_secs().max(3);
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(secs)
        .with_grace((secs / 3).max(1))
        .build()
        .await?;
    let (mut leader, task) = manager.watch().await;
    info!(lease = %config.name, identity = %config.identity, "waiting for leadership");
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            changed = leader.wait_for(|l| *l) => if changed.is_err() { break },
        }
        info!(identity = %config.identity, "acquired leadership");
        lead(LostLeadership {
            leader: leader.clone(),
            shutdown: shutdown.clone(),
        })
        .await;
        if *shutdown.borrow() {
            break;
        }
        warn!(identity = %config.identity, "lost leadership; waiting to acquire it again");
    }
    // Dropping the receiver makes the manager release the lease.
    drop(leader);
    match task.await {
        Ok(res) => res.map(drop),
        Err(e) => {
            warn!(error = %e, "lease task ended abnormally");
            Ok(())
        }
    }
}

/// Resolves when this replica is no longer the leader, or on shutdown.
pub struct LostLeadership {
    leader: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
}

impl LostLeadership {
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.leader.wait_for(|l| !*l) => {},
            _ = self.shutdown.wait_for(|s| *s) => {},
        }
    }
}
