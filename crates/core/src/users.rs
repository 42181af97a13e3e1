//! Accounts as every service sees them: the system role a user has, which
//! access tokens carry so that each service can enforce it locally.

use serde::{Deserialize, Serialize};

use crate::names::names;

/// What a user may do across the system (room roles are separate).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemRole {
    /// Everything, and the `/api/v1/admin` endpoints.
    Admin,
    /// A registered user: creates rooms, joins public ones, sends, reads.
    Member,
    /// Joins public rooms, sends and reads; creates no rooms.
    Guest,
}

names!(SystemRole, "system role", Admin => "admin", Member => "member", Guest => "guest");

impl SystemRole {
    pub fn is_admin(self) -> bool {
        self == Self::Admin
    }

    /// Whether this role may create rooms.
    pub fn creates_rooms(self) -> bool {
        self != Self::Guest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_unknown_ones_are_errors() {
        for role in [SystemRole::Admin, SystemRole::Member, SystemRole::Guest] {
            assert_eq!(role.as_str().parse(), Ok(role));
            assert_eq!(serde_json::to_value(role).ok(), Some(role.as_str().into()));
        }
        assert!("root".parse::<SystemRole>().is_err());
        assert!(!SystemRole::Guest.creates_rooms() && SystemRole::Member.creates_rooms());
    }
}
