//! Rooms as every party sees them: a member's role and a room's visibility,
//! with the exact strings the APIs and the databases use.

use serde::{Deserialize, Serialize};

pub use crate::names::UnknownVariant;
use crate::names::names;

/// A member's role in a room.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Created the room.
    Owner,
    Member,
}

/// Who may join a room.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone may join.
    Public,
    /// Members only.
    Private,
}

names!(Role, "role", Owner => "owner", Member => "member");
names!(Visibility, "visibility", Public => "public", Private => "private");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for role in [Role::Owner, Role::Member] {
            assert_eq!(role.as_str().parse(), Ok(role));
            assert_eq!(serde_json::to_value(role).ok(), Some(role.as_str().into()));
        }
        for visibility in [Visibility::Public, Visibility::Private] {
            assert_eq!(visibility.as_str().parse(), Ok(visibility));
        }
        assert_eq!(
            "admin".parse::<Role>().map_err(|e| e.to_string()),
            Err("unknown role `admin`".to_owned())
        );
        assert!("Public".parse::<Visibility>().is_err());
    }
}
