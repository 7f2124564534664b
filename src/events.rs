//! Kubernetes Events with a bounded memory.
//!
//! kube's `Recorder` keeps every Event it publishes for six minutes, so that a
//! repeat of the same Event bumps a series count instead of creating another
//! object. With thousands of AmiCopies that cache grows to tens of megabytes
//! (each entry is a whole Event). Like client-go's event correlator, which
//! keeps the latest 4,096, the cache here is bounded: after [`CACHE_LIMIT`]
//! Events a fresh `Recorder` takes over, and a repeat of an older Event starts
//! a new series.

use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
use tracing::warn;

/// Events published through one `Recorder` before the next takes over.
pub const CACHE_LIMIT: usize = 512;

pub struct Events {
    recorders: Rotating<Recorder>,
    client: Client,
    reporter: Reporter,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            recorders: Rotating::new(CACHE_LIMIT),
            client,
            reporter,
        }
    }

    /// Publishes an Event about `reference`; a failure is logged, never
    /// the caller's concern.
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) {
        let recorder = self
            .recorders
            .next(|| Recorder::new(self.client.clone(), self.reporter.clone()));
        if let Err(e) = recorder.publish(event, reference).await {
            warn!(error = %e, "could not publish an event");
        }
    }
}

/// A value handed out `limit` times, then made anew.
struct Rotating<T> {
    limit: usize,
    current: Mutex<Option<(T, usize)>>,
}

impl<T: Clone> Rotating<T> {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            current: Mutex::new(None),
        }
    }

    fn next(&self, make: impl FnOnce() -> T) -> T {
        let mut current = self.current.lock().expect("events lock");
        match current.as_mut() {
            Some((value, used)) if *used < self.limit => {
                *used += 1;
                value.clone()
            }
            _ => {
                let value = make();
                *current = Some((value.clone(), 1));
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_value_after_the_limit() {
        let rotating = Rotating::new(3);
        let mut made = 0;
        let mut next = || {
            rotating.next(|| {
                made += 1;
                made
            })
        };
        let handed: Vec<i32> = (0..7).map(|_| next()).collect();
        assert_eq!(handed, [1, 1, 1, 2, 2, 2, 3]);
    }
}
