//! The metric registry of a process. Each crate declares its own metrics (a
//! struct of counters and gauges next to the code that moves them) and
//! registers them here when its service starts; `/metrics` renders whatever
//! is registered, next to the standard `process_*` metrics. Names follow one
//! convention: `unhidra_` prefix, base units, `_total` for counters.
//! `docs/operations.md` explains each metric.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, TextEncoder, core::Collector,
};

/// Seconds, from 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A registry that renders the Prometheus text exposition; clones share it.
#[derive(Clone)]
pub struct Metrics {
    registry: prometheus::Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry holding the process metrics (CPU, memory, open files).
    pub fn new() -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self { registry })
    }

    /// Registers any collector; a name registered twice is an error.
    pub fn register<C: Collector + Clone + 'static>(&self, collector: C) -> anyhow::Result<C> {
        self.registry
            .register(Box::new(collector.clone()))
            .map_err(|e| anyhow::anyhow!("registering a metric: {e}"))?;
        Ok(collector)
    }

    pub fn counter(&self, name: &str, help: &str) -> anyhow::Result<IntCounter> {
        self.register(IntCounter::new(name, help)?)
    }

    pub fn gauge(&self, name: &str, help: &str) -> anyhow::Result<IntGauge> {
        self.register(IntGauge::new(name, help)?)
    }

    /// A counter per label value; every value in `series` is exported from
    /// the start, at 0.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: &[&[&str]],
    ) -> anyhow::Result<IntCounterVec> {
        let vec = self.register(IntCounterVec::new(Opts::new(name, help), labels)?)?;
        for values in series {
            vec.with_label_values(values);
        }
        Ok(vec)
    }

    pub fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> anyhow::Result<IntGaugeVec> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A histogram without labels over `buckets` (for latencies, seconds,
    /// [`LATENCY_BUCKETS`]).
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> anyhow::Result<Histogram> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }

    /// A latency histogram (seconds, [`LATENCY_BUCKETS`]); every value in
    /// `series` is exported from the start.
    pub fn latency_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: &[&[&str]],
    ) -> anyhow::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let vec = self.register(HistogramVec::new(opts, labels)?)?;
        for values in series {
            vec.with_label_values(values);
        }
        Ok(vec)
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_render_with_help_and_names_are_unique() -> anyhow::Result<()> {
        let metrics = Metrics::new()?;
        let sent = metrics.counter("unhidra_test_sent_total", "Things sent.")?;
        metrics.counter_vec(
            "unhidra_test_outcomes_total",
            "Outcomes.",
            &["outcome"],
            &[&["success"], &["failure"]],
        )?;
        sent.inc_by(3);
        let text = metrics.render();
        assert!(text.contains("# HELP unhidra_test_sent_total Things sent.\n"));
        assert!(text.contains("unhidra_test_sent_total 3\n"));
        assert!(text.contains("unhidra_test_outcomes_total{outcome=\"failure\"} 0\n"));
        assert!(
            metrics
                .counter("unhidra_test_sent_total", "Again.")
                .is_err()
        );
        // Another registry (another stack in the same process) counts apart.
        let other = Metrics::new()?;
        other.counter("unhidra_test_sent_total", "Things sent.")?;
        assert!(other.render().contains("unhidra_test_sent_total 0\n"));
        Ok(())
    }
}
