//! How events and frames carry a time: RFC 3339 in UTC with a `Z`, the
//! fraction of a second as precise as needed, which is chrono's own serde
//! form, written and read faster. Use as `#[serde(with =
//! "crate::timestamps")]` on a `DateTime<Utc>`.
//!
//! chrono's serde impl hands its text to the serializer a character at a
//! time (each escaped on its own) and reads with its relaxed parser; on the
//! message path a message's time is written twice and read twice, which
//! took about 4 % of its instructions. Here the text is written in one
//! piece, and read with the strict RFC 3339 parser, falling back to the
//! relaxed one, so every text chrono's impl accepts is accepted the same.

use std::fmt;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde::{Deserializer, Serializer, de};

pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(Rfc3339)
}

struct Rfc3339;

impl de::Visitor<'_> for Rfc3339 {
    type Value = DateTime<Utc>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        DateTime::parse_from_rfc3339(text)
            .or_else(|_| text.parse::<DateTime<FixedOffset>>())
            .map(|at| at.with_timezone(&Utc))
            .map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Ours(#[serde(with = "crate::timestamps")] DateTime<Utc>);

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Chronos(DateTime<Utc>);

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let second = Utc
            .with_ymd_and_hms(2026, 12, 7, 20, 6, 1)
            .single()
            .expect("a time");
        let fractions = [
            0,
            1,
            999,
            1_000,
            120_000,
            1_000_000,
            123_000_000,
            123_456_789,
        ];
        let times = fractions
            .iter()
            .map(|nanos| second + Duration::nanoseconds(*nanos))
            .chain([
                DateTime::<Utc>::UNIX_EPOCH,
                Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0)
                    .single()
                    .expect("year 1"),
                Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                    .single()
                    .expect("year 9999"),
                Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0)
                    .single()
                    .expect("year 12345"),
                Utc::now(),
            ]);
        for at in times {
            let ours = serde_json::to_string(&Ours(at)).expect("written");
            assert_eq!(ours, serde_json::to_string(&Chronos(at)).expect("written"));
            assert_eq!(serde_json::from_str::<Ours>(&ours).expect("read"), Ours(at));
        }
    }

    #[test]
    fn times_are_read_as_chrono_reads_them() {
        for text in [
            "2026-12-07T20:06:01Z",
            "2026-12-07T20:06:01.5+01:00",
            "2026-12-07t20:06:01.123456789z",
            "2026-12-07 20:06:01-00:30",
            "2026-12-07T23:59:60.5Z",
            "2026-12-07T20:06:01",
            "2026-12-07",
            "yesterday",
            "",
        ] {
            let json = serde_json::to_string(text).expect("a JSON string");
            let ours = serde_json::from_str::<Ours>(&json).map(|o| o.0);
            let theirs = serde_json::from_str::<Chronos>(&json).map(|c| c.0);
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "{text}"),
                (Err(ours), Err(theirs)) => {
                    assert_eq!(ours.to_string(), theirs.to_string(), "{text}")
                }
                (ours, theirs) => panic!("{text}: ours {ours:?}, chrono's {theirs:?}"),
            }
        }
        let not_a_string = serde_json::from_str::<Ours>("1765137961").expect_err("refused");
        assert!(
            not_a_string.to_string().contains("RFC 3339"),
            "{not_a_string}"
        );
    }
}
