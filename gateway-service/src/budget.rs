//! A connection's frame budget: frames per second and bytes per second
//! (`UNHIDRA_LIMIT_WS_FRAMES`, `UNHIDRA_LIMIT_WS_BYTES`). A frame over budget
//! is answered with a `rate_limited` error that says when to retry, and the
//! connection stays usable; a client that keeps sending a whole burst more
//! while refused is closed with 1008.

use std::time::Duration;

use unhidra_core::clock::SharedClock;
use unhidra_ratelimit::{Bucket, Limit};

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refuse it; the client may retry after this long.
    Refuse(Duration),
    /// The client ignores refusals: close the connection.
    Close,
}

pub struct FrameBudget {
    frames: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Frames refused since the last accepted one.
    refused_in_a_row: u32,
    /// Beyond this many refusals in a row the connection is closed.
    tolerance: u32,
}

impl FrameBudget {
    pub fn new(frames: Option<&Limit>, bytes: Option<&Limit>, clock: &SharedClock) -> Self {
        let bucket = |limit: Option<&Limit>| limit.map(|l| Bucket::new(l.clone(), clock.clone()));
        Self {
            tolerance: frames.map_or(u32::MAX, |l| l.count().saturating_mul(2).max(16)),
            frames: bucket(frames),
            bytes: bucket(bytes),
            refused_in_a_row: 0,
        }
    }

    /// Counts a frame of `size` bytes.
    pub fn take(&mut self, size: usize) -> Verdict {
        let mut retry_after = Duration::ZERO;
        if let Some(frames) = &self.frames {
            let decision = frames.take(1);
            if !decision.allowed {
                retry_after = decision.retry_after;
            }
        }
        if retry_after.is_zero() {
            if let Some(bytes) = &self.bytes {
                let cost = u32::try_from(size)
                    .unwrap_or(u32::MAX)
                    .min(bytes.limit().count());
                let decision = bytes.take(cost);
                if !decision.allowed {
                    retry_after = decision.retry_after;
                }
            }
        }
        if retry_after.is_zero() {
            self.refused_in_a_row = 0;
            return Verdict::Accept;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > self.tolerance {
            Verdict::Close
        } else {
            Verdict::Refuse(retry_after)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use unhidra_core::{clock::ManualClock, rate::Rate};

    use super::*;

    #[test]
    fn refusals_then_a_close_for_a_client_that_ignores_them() {
        let clock: SharedClock = Arc::new(ManualClock::starting_at(Duration::from_secs(10)));
        let frames = Limit::new("ws_frames", Rate::new(10, Duration::from_secs(1)));
        let bytes = Limit::new("ws_bytes", Rate::new(2048, Duration::from_secs(1)));
        let mut budget = FrameBudget::new(frames.as_ref(), bytes.as_ref(), &clock);
        for _ in 0..10 {
            assert_eq!(budget.take(10), Verdict::Accept);
        }
        assert_eq!(budget.take(10), Verdict::Refuse(Duration::from_millis(100)));
        for _ in 1..20 {
            assert!(matches!(budget.take(10), Verdict::Refuse(_)));
        }
        assert_eq!(budget.take(10), Verdict::Close, "21 refusals in a row");

        let mut budget = FrameBudget::new(None, bytes.as_ref(), &clock);
        assert_eq!(budget.take(2000), Verdict::Accept);
        assert!(
            matches!(budget.take(100), Verdict::Refuse(_)),
            "bytes count too"
        );
        let mut unlimited = FrameBudget::new(None, None, &clock);
        assert_eq!(unlimited.take(1 << 20), Verdict::Accept);
    }
}
