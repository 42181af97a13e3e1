//! Typed identifiers. Every id is a UUIDv7, so ids sort by creation time and a
//! `RoomId` can never be passed where a `UserId` is expected.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id!(
    /// A registered person or device owner.
    UserId
);
id!(
    /// A login session; refresh tokens and access tokens (`sid`) belong to one.
    SessionId
);
id!(
    /// A registered device of a user (`did` in its access tokens).
    DeviceId
);
id!(
    /// An API key (its tokens' `sid` in revocations is the same UUID).
    ApiKeyId
);
id!(
    /// A chat room.
    RoomId
);
id!(
    /// One message in a room; the idempotency key of its bus event.
    MessageId
);
id!(
    /// One security event in the audit log.
    AuditEventId
);
