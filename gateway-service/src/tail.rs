//! The latest messages of a room this gateway follows, as the frames sent
//! to its members, kept so that a `resume` or a join catch-up takes what it
//! missed from memory and asks history only for what is older. A reconnect
//! storm (a gateway drained, a network blip) then costs history nothing.

use std::collections::BTreeMap;

use axum::extract::ws::Utf8Bytes;

/// The most bytes of frames one room's tail keeps, whatever its capacity:
/// a room of large messages keeps fewer.
pub const MAX_BYTES: usize = 256 * 1024;

/// At most `capacity` messages (and [`MAX_BYTES`]) by sequence; the lowest
/// go first. Messages may come out of sequence order (two chat-service
/// instances publish the same room), so nothing assumes the kept ones are
/// contiguous.
pub struct RoomTail {
    frames: BTreeMap<u64, Utf8Bytes>,
    bytes: usize,
    capacity: usize,
}

impl RoomTail {
    pub fn new(capacity: usize) -> Self {
        Self {
            frames: BTreeMap::new(),
            bytes: 0,
            capacity,
        }
    }

    pub fn push(&mut self, seq: u64, frame: &Utf8Bytes) {
        if self.capacity == 0 {
            return;
        }
        if let Some(old) = self.frames.insert(seq, frame.clone()) {
            self.bytes -= old.len();
        }
        self.bytes += frame.len();
        while self.frames.len() > self.capacity || self.bytes > MAX_BYTES {
            let Some((_, evicted)) = self.frames.pop_first() else {
                break;
            };
            self.bytes -= evicted.len();
        }
    }

    /// The kept messages with `after < seq <= up_to`, in order.
    pub fn range(&self, after: u64, up_to: u64) -> Vec<(u64, Utf8Bytes)> {
        if after >= up_to {
            return Vec::new();
        }
        self.frames
            .range(after + 1..=up_to)
            .map(|(seq, frame)| (*seq, frame.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(tail: &RoomTail, after: u64, up_to: u64) -> Vec<u64> {
        tail.range(after, up_to)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn keeps_the_latest_by_sequence_whatever_the_arrival_order() {
        let mut tail = RoomTail::new(3);
        for seq in [2, 1, 4, 3, 5] {
            tail.push(seq, &Utf8Bytes::from(format!("m{seq}")));
        }
        assert_eq!(seqs(&tail, 0, 10), [3, 4, 5]);
        assert_eq!(seqs(&tail, 3, 4), [4]);
        assert_eq!(seqs(&tail, 5, 5), Vec::<u64>::new());
        assert_eq!(tail.range(3, 4)[0].1.as_str(), "m4");
    }

    #[test]
    fn large_frames_are_kept_up_to_the_byte_bound() {
        let mut tail = RoomTail::new(1000);
        let frame = Utf8Bytes::from("x".repeat(MAX_BYTES / 4));
        for seq in 1..=10 {
            tail.push(seq, &frame);
        }
        assert_eq!(seqs(&tail, 0, 10), [7, 8, 9, 10]);
    }

    #[test]
    fn a_tail_of_zero_keeps_nothing() {
        let mut tail = RoomTail::new(0);
        tail.push(1, &Utf8Bytes::from("m1"));
        assert!(tail.range(0, 1).is_empty());
    }
}
