//! Rooms and their members, in the chat database.

use anyhow::Context;
use unhidra_core::{
    ids::{RoomId, UserId},
    rooms::{Role, Visibility},
};
use unhidra_store::{Database, now_millis};

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub id: RoomId,
    pub name: String,
    pub visibility: Visibility,
}

/// Why a user has no role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoSuchRoom,
    NotAMember,
}

#[derive(Clone, Debug)]
pub struct RoomRepo {
    db: Database,
}

fn room_id(raw: &str) -> anyhow::Result<RoomId> {
    raw.parse()
        .with_context(|| format!("stored room id `{raw}` is not a room id"))
}

impl RoomRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Stores a new room with `owner` as its first member, in one transaction.
    pub async fn create(&self, room: &Room, owner: UserId) -> anyhow::Result<()> {
        let now = now_millis();
        let mut write = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO rooms (id, name, visibility, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(room.id.to_string())
        .bind(&room.name)
        .bind(room.visibility.as_str())
        .bind(owner.to_string())
        .bind(now)
        .execute(&mut *write.tx)
        .await?;
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(room.id.to_string())
        .bind(owner.to_string())
        .bind(Role::Owner.as_str())
        .bind(now)
        .execute(&mut *write.tx)
        .await?;
        write.commit().await?;
        Ok(())
    }

    pub async fn get(&self, id: RoomId) -> anyhow::Result<Option<Room>> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT name, visibility FROM rooms WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&self.db.pool)
                .await?;
        row.map(|(name, visibility)| {
            Ok(Room {
                id,
                name,
                visibility: visibility.parse()?,
            })
        })
        .transpose()
    }

    /// The user's role in the room, or why there is none.
    pub async fn role_of(
        &self,
        room: RoomId,
        user: UserId,
    ) -> anyhow::Result<Result<Role, Refusal>> {
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT m.role FROM rooms r
             LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2
             WHERE r.id = $1",
        )
        .bind(room.to_string())
        .bind(user.to_string())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(match row {
            None => Err(Refusal::NoSuchRoom),
            Some((None,)) => Err(Refusal::NotAMember),
            Some((Some(role),)) => Ok(role.parse()?),
        })
    }

    /// Adds a member; false when the user already was one.
    pub async fn add_member(&self, room: RoomId, user: UserId, role: Role) -> anyhow::Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(room.to_string())
        .bind(user.to_string())
        .bind(role.as_str())
        .bind(now_millis())
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// The rooms `user` belongs to, with the user's role, by room id.
    pub async fn of_member(&self, user: UserId) -> anyhow::Result<Vec<(Room, Role)>> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT r.id, r.name, r.visibility, m.role FROM rooms r
             JOIN room_members m ON m.room_id = r.id WHERE m.user_id = $1 ORDER BY r.id",
        )
        .bind(user.to_string())
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|(id, name, visibility, role)| {
                let room = Room {
                    id: room_id(&id)?,
                    name,
                    visibility: visibility.parse()?,
                };
                Ok((room, role.parse()?))
            })
            .collect()
    }

    /// The ids of the rooms `user` belongs to.
    pub async fn ids_of_member(&self, user: UserId) -> anyhow::Result<Vec<RoomId>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT room_id FROM room_members WHERE user_id = $1")
                .bind(user.to_string())
                .fetch_all(&self.db.pool)
                .await?;
        rows.iter().map(|(id,)| room_id(id)).collect()
    }
}
