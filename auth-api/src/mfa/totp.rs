//! Time-based one-time passwords (RFC 6238 over RFC 4226): HMAC-SHA1, 30 s
//! steps, 6 digits, as every authenticator app computes them.

use std::time::Duration;

use ring::hmac;

pub const STEP: Duration = Duration::from_secs(30);
pub const DIGITS: u32 = 6;

/// The step `now` (time since the epoch) falls in.
pub fn step_at(now: Duration) -> u64 {
    now.as_secs() / STEP.as_secs()
}

/// The code of `step` for `secret`.
pub fn code(secret: &[u8], step: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let truncated = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    truncated % 10_u32.pow(DIGITS)
}

/// The step whose code `given` is, within one step of `now` either way
/// (clock drift), if any.
pub fn matching_step(secret: &[u8], given: &str, now: Duration) -> Option<u64> {
    let given = given.trim();
    if given.len() != DIGITS as usize || !given.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let given: u32 = given.parse().ok()?;
    let current = step_at(now);
    [current.saturating_sub(1), current, current + 1]
        .into_iter()
        .find(|step| constant_time_eq(code(secret, *step), given))
}

/// Equal, without a branch on where two codes differ.
fn constant_time_eq(a: u32, b: u32) -> bool {
    std::hint::black_box(a ^ b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6238_vectors_with_sha1() {
        // RFC 6238, appendix B: the 8-digit codes, whose last 6 digits are ours.
        let secret = b"12345678901234567890";
        for (time, expected) in [
            (59, 94_287_082_u32),
            (1_111_111_109, 7_081_804),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
        ] {
            assert_eq!(code(secret, time / 30), expected % 1_000_000, "T = {time}");
        }
    }

    #[test]
    fn a_code_matches_within_one_step_only() {
        let secret = b"12345678901234567890";
        let now = Duration::from_secs(1_234_567_890);
        let current = format!("{:06}", code(secret, step_at(now)));
        assert_eq!(matching_step(secret, &current, now), Some(step_at(now)));
        assert_eq!(
            matching_step(secret, &current, now + STEP),
            Some(step_at(now))
        );
        assert_eq!(matching_step(secret, &current, now + STEP * 2), None);
        for bad in ["", "12345", "1234567", "abcdef", "12 345"] {
            assert_eq!(matching_step(secret, bad, now), None, "{bad:?}");
        }
    }
}
