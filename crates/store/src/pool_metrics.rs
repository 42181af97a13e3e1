//! `unhidra_db_pool_connections{service, state}`: read from the pool itself
//! whenever metrics are gathered, so the numbers are current at every scrape
//! and nothing else has to keep them up to date.

use prometheus::{
    IntGaugeVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use sqlx::AnyPool;

use crate::Database;

/// Reports one service's pool: connections `in_use` and `idle`.
#[derive(Clone, Debug)]
pub struct PoolCollector {
    pool: AnyPool,
    gauge: IntGaugeVec,
}

impl Database {
    /// The collector of this pool, labelled with the service that owns it.
    pub fn pool_collector(&self, service: &str) -> prometheus::Result<PoolCollector> {
        let opts = Opts::new(
            "unhidra_db_pool_connections",
            "Database pool connections by service and state (`in_use`, `idle`).",
        )
        .const_label("service", service);
        Ok(PoolCollector {
            pool: self.pool.clone(),
            gauge: IntGaugeVec::new(opts, &["state"])?,
        })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        let size = i64::from(self.pool.size());
        self.gauge.with_label_values(&["idle"]).set(idle);
        self.gauge
            .with_label_values(&["in_use"])
            .set(size.saturating_sub(idle));
        self.gauge.collect()
    }
}
