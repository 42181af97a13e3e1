//! What a run measured, as JSON and as a Markdown table.

use hdrhistogram::Histogram;
use serde::Serialize;

/// An empty histogram of microseconds, 1 µs to 60 s, three significant
/// digits: every latency the loadgen records goes into one.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: histogram.max() as f64 / 1000.0,
        }
    }
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    /// The scenario's parameters, as given.
    pub parameters: serde_json::Value,
    /// `name` → value, in the order they were measured.
    pub figures: Vec<(String, f64)>,
    pub latencies: Vec<(String, Latency)>,
    /// What went missing or wrong; empty on a clean run.
    pub failures: Vec<String>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### {} against {}\n\n`{}`\n\n| figure | value |\n|---|---|\n",
            self.scenario, self.target, self.parameters
        );
        for (name, value) in &self.figures {
            out.push_str(&format!("| {name} | {} |\n", round(*value)));
        }
        for (name, l) in &self.latencies {
            out.push_str(&format!(
                "| {name} latency p50 / p99 / p99.9 / max (ms) | {} / {} / {} / {} |\n",
                round(l.p50_ms),
                round(l.p99_ms),
                round(l.p999_ms),
                round(l.max_ms)
            ));
        }
        if self.failures.is_empty() {
            out.push_str("| failures | none |\n");
        } else {
            for failure in &self.failures {
                out.push_str(&format!("| FAILURE | {failure} |\n"));
            }
        }
        out
    }
}

fn round(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}
