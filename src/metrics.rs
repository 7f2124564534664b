//! Prometheus metrics. Labels are bounded (operation, region, outcome,
//! category): never one series per object.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ec2CallLabels {
    operation: &'static str,
    region: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionLabels {
    region: String,
}

/// One condition of one object, as the objects gauge counts it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    condition: String,
    status: String,
    reason: String,
}

/// The operator's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    ec2_calls: Family<Ec2CallLabels, Counter>,
    ec2_call_seconds: Family<Ec2CallLabels, Histogram>,
    reconciles: Family<OutcomeLabels, Counter>,
    reconcile_seconds: Histogram,
    copies_started: Family<RegionLabels, Counter>,
    copies_in_flight: Family<RegionLabels, Gauge>,
    copies_queued: Family<RegionLabels, Gauge>,
    copy_seconds: Family<RegionLabels, Histogram>,
    objects: Family<ConditionLabels, Gauge>,
    leading: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("amicopy");
        let ec2_calls = Family::<Ec2CallLabels, Counter>::default();
        let ec2_call_seconds = Family::<Ec2CallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let copies_started = Family::<RegionLabels, Counter>::default();
        let copies_in_flight = Family::<RegionLabels, Gauge>::default();
        let copies_queued = Family::<RegionLabels, Gauge>::default();
        let copy_seconds = Family::<RegionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        registry.register(
            "ec2_calls",
            "EC2 API calls by operation, region and outcome",
            ec2_calls.clone(),
        );
        registry.register(
            "ec2_call_duration_seconds",
            "Duration of EC2 API calls",
            ec2_call_seconds.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles by outcome (ok or an error category)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            reconcile_seconds.clone(),
        );
        registry.register(
            "copies_started",
            "CopyImage calls that started a copy, by destination region",
            copies_started.clone(),
        );
        registry.register(
            "copies_in_flight",
            "Copies started and still pending, by destination region (batched tracking)",
            copies_in_flight.clone(),
        );
        registry.register(
            "copies_queued",
            "Objects waiting for a copy slot, by destination region",
            copies_queued.clone(),
        );
        registry.register(
            "copy_duration_seconds",
            "Time from CopyImage to the copy seen available, by destination region",
            copy_seconds.clone(),
        );
        let objects = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "objects",
            "AmiCopies by condition, its status and reason (as last reconciled by this replica)",
            objects.clone(),
        );
        let leading = Gauge::default();
        registry.register(
            "leading",
            "1 while this replica reconciles (it holds the Lease, or runs without leader election)",
            leading.clone(),
        );
        Self {
            registry,
            ec2_calls,
            ec2_call_seconds,
            reconciles,
            reconcile_seconds,
            copies_started,
            copies_in_flight,
            copies_queued,
            copy_seconds,
            objects,
            leading,
        }
    }
}

impl Metrics {
    pub fn ec2_call(
        &self,
        operation: &'static str,
        region: &str,
        outcome: &'static str,
        took: Duration,
    ) {
        let labels = Ec2CallLabels {
            operation,
            region: region.to_owned(),
            outcome,
        };
        self.ec2_calls.get_or_create(&labels).inc();
        self.ec2_call_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn reconciled(&self, outcome: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn copy_started(&self, region: &str) {
        self.copies_started
            .get_or_create(&RegionLabels {
                region: region.to_owned(),
            })
            .inc();
    }

    pub fn set_copy_load(&self, region: &str, in_flight: usize, queued: usize) {
        let labels = RegionLabels {
            region: region.to_owned(),
        };
        self.copies_in_flight
            .get_or_create(&labels)
            .set(in_flight as i64);
        self.copies_queued.get_or_create(&labels).set(queued as i64);
    }

    pub fn copy_finished(&self, region: &str, took: Duration) {
        let labels = RegionLabels {
            region: region.to_owned(),
        };
        self.copy_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The conditions of one object as labels of the objects gauge.
    pub fn condition_labels(
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) -> Vec<ConditionLabels> {
        conditions
            .iter()
            .map(|c| ConditionLabels {
                condition: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
            })
            .collect()
    }

    /// One object's conditions went from `old` to `new` (empty: the object
    /// is gone).
    pub fn object_conditions(&self, old: &[ConditionLabels], new: &[ConditionLabels]) {
        for l in old {
            self.objects.get_or_create(l).dec();
        }
        for l in new {
            self.objects.get_or_create(l).inc();
        }
    }

    /// Whether this replica reconciles now.
    pub fn set_leading(&self, leading: bool) {
        self.leading.set(i64::from(leading));
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
