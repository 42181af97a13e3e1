//! A rate setting as operators write it: `5/min`, `100/s`, `1048576/s`,
//! `3/h`, `1000/d`, or `off`.

use std::{fmt, num::NonZeroU32, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// At most `count` events per `period`, in bursts of up to `count`; or no
/// limit at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Off,
    Every { count: NonZeroU32, period: Duration },
}

impl Rate {
    /// `count` per `period`; `Off` when `count` is zero.
    pub fn new(count: u32, period: Duration) -> Self {
        match NonZeroU32::new(count) {
            Some(count) if !period.is_zero() => Self::Every { count, period },
            _ => Self::Off,
        }
    }

    pub const fn per_second(count: NonZeroU32) -> Self {
        Self::Every {
            count,
            period: Duration::from_secs(1),
        }
    }

    pub const fn per_minute(count: NonZeroU32) -> Self {
        Self::Every {
            count,
            period: Duration::from_secs(60),
        }
    }
}

/// Why a rate setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a rate: write a count and a unit, such as 5/min, 100/s, 3/h, 1000/d, or off")]
pub struct RateError(String);

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refused = || RateError(text.to_owned());
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let (count, unit) = text.split_once('/').ok_or_else(refused)?;
        let count: u32 = count.trim().parse().map_err(|_| refused())?;
        let count = NonZeroU32::new(count).ok_or_else(refused)?;
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            "d" | "day" => 86_400,
            _ => return Err(refused()),
        };
        Ok(Self::Every {
            count,
            period: Duration::from_secs(seconds),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Every { count, period } => {
                let unit = match period.as_secs() {
                    1 => "s".to_owned(),
                    60 => "min".to_owned(),
                    3600 => "h".to_owned(),
                    86_400 => "d".to_owned(),
                    _ => format!("{}ms", period.as_millis()),
                };
                write!(f, "{count}/{unit}")
            }
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_as_operators_write_them() {
        let five = NonZeroU32::new(5).map(Rate::per_minute);
        assert_eq!("5/min".parse().ok(), five);
        assert_eq!(" 5 / m ".parse().ok(), five);
        assert_eq!("off".parse(), Ok(Rate::Off));
        assert_eq!(
            "3/h".parse::<Rate>().map(|r| r.to_string()),
            Ok("3/h".to_owned())
        );
        for bad in ["", "5", "0/s", "-1/s", "5/week", "five/min", "5/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        assert_eq!(Rate::new(0, Duration::from_secs(1)), Rate::Off);
    }
}
