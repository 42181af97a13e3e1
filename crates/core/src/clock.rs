//! Wall-clock time behind a trait, so that rate-limit windows, lockouts and
//! blocks can be tested with a clock the test moves instead of with sleeps.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The time, as a duration since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Duration;

    /// The time in Unix milliseconds, as the stores keep it.
    fn now_millis(&self) -> i64 {
        i64::try_from(self.now().as_millis()).unwrap_or(i64::MAX)
    }
}

/// A shared clock, as services hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A clock that moves only when told to, with microsecond resolution.
#[derive(Debug, Default)]
pub struct ManualClock {
    micros: AtomicU64,
}

impl ManualClock {
    /// Starts at `start` after the epoch.
    pub fn starting_at(start: Duration) -> Self {
        Self {
            micros: AtomicU64::new(u64::try_from(start.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::starting_at(Duration::from_secs(100));
        assert_eq!(clock.now(), Duration::from_secs(100));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Duration::from_millis(101_500));
        assert!(SystemClock.now() > Duration::from_secs(1_700_000_000));
    }
}
