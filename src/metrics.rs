//! Prometheus metrics. Labels are bounded (operation, region, outcome,
//! category): never one series per object.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// The operator's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    ec2_calls: Family<Ec2CallLabels, Counter>,
    ec2_call_seconds: Family<Ec2CallLabels, Histogram>,
    reconciles: Family<OutcomeLabels, Counter>,
    reconcile_seconds: Histogram,
    copies_started: Family<RegionLabels, Counter>,
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
        Self {
            registry,
            ec2_calls,
            ec2_call_seconds,
            reconciles,
            reconcile_seconds,
            copies_started,
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

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
