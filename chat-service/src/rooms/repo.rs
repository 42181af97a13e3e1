//! Rooms and their members, in the chat database.

use anyhow::Context;
use unhidra_core::{
    ids::{RoomId, UserId},
    rooms::{Role, Visibility},
    rpc::UserRooms,
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

/// How many rooms a user may belong to, and members a room may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub rooms_per_user: u32,
    pub members_per_room: u32,
}

/// A cap that refused a membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("you already belong to {0} rooms, the most allowed")]
    UserRooms(u32),
    #[error("this room already has {0} members, the most allowed")]
    RoomMembers(u32),
}

#[derive(Clone, Debug)]
pub struct RoomRepo {
    db: Database,
    caps: Caps,
}

fn room_id(raw: &str) -> anyhow::Result<RoomId> {
    raw.parse()
        .with_context(|| format!("stored room id `{raw}` is not a room id"))
}

impl RoomRepo {
    pub fn new(db: Database, caps: Caps) -> Self {
        Self { db, caps }
    }

    /// Stores a new room with `owner` as its first member, in one
    /// transaction, unless the owner already belongs to as many rooms as
    /// allowed.
    pub async fn create(&self, room: &Room, owner: UserId) -> anyhow::Result<Result<(), Full>> {
        let now = now_millis();
        // Writes first: on a SQLite file shared by several processes, a
        // transaction that reads before it writes can fail to upgrade its lock.
        let mut write = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO rooms (id, name, visibility, created_by, created_at, epoch)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(room.id.to_string())
        .bind(&room.name)
        .bind(room.visibility.as_str())
        .bind(owner.to_string())
        .bind(now)
        .bind(&uuid::Uuid::new_v4().simple().to_string()[..12])
        .execute(write.conn())
        .await?;
        let joined = sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, joined_at)
             SELECT $1, $2, $3, $4
             WHERE (SELECT COUNT(*) FROM room_members WHERE user_id = $2) < $5",
        )
        .bind(room.id.to_string())
        .bind(owner.to_string())
        .bind(Role::Owner.as_str())
        .bind(now)
        .bind(i64::from(self.caps.rooms_per_user))
        .execute(write.conn())
        .await?
        .rows_affected();
        if joined == 0 {
            // Dropping the transaction rolls the room back.
            return Ok(Err(Full::UserRooms(self.caps.rooms_per_user)));
        }
        write.commit().await?;
        Ok(Ok(()))
    }

    /// The room's latest sequence (0 before its first message or when it
    /// does not exist).
    pub async fn last_seq(&self, id: RoomId) -> anyhow::Result<u64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(seq.map_or(0, |seq| u64::try_from(seq).unwrap_or(0)))
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

    /// The members of `room`, if `user` is one of them.
    pub async fn members(
        &self,
        room: RoomId,
        user: UserId,
    ) -> anyhow::Result<Result<Vec<UserId>, Refusal>> {
        if let Err(refusal) = self.role_of(room, user).await? {
            return Ok(Err(refusal));
        }
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT user_id FROM room_members WHERE room_id = $1 ORDER BY user_id")
                .bind(room.to_string())
                .fetch_all(&self.db.pool)
                .await?;
        let members = rows
            .iter()
            .map(|(id,)| id.parse())
            .collect::<Result<_, _>>()?;
        Ok(Ok(members))
    }

    /// The room's latest sequence and its epoch, if `user` is a member.
    pub async fn head(
        &self,
        room: RoomId,
        user: UserId,
    ) -> anyhow::Result<Result<(u64, String), Refusal>> {
        let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT r.last_seq, r.epoch, m.role FROM rooms r
             LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2
             WHERE r.id = $1",
        )
        .bind(room.to_string())
        .bind(user.to_string())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(match row {
            None => Err(Refusal::NoSuchRoom),
            Some((_, _, None)) => Err(Refusal::NotAMember),
            Some((seq, epoch, Some(_))) => Ok((u64::try_from(seq)?, epoch)),
        })
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

    /// Adds a member if both caps allow it (checked in the same statement;
    /// concurrent joins may pass a cap by a few); `Ok(false)` when the user
    /// already was one.
    pub async fn add_member(
        &self,
        room: RoomId,
        user: UserId,
        role: Role,
    ) -> anyhow::Result<Result<bool, Full>> {
        let inserted = sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, joined_at)
             SELECT $1, $2, $3, $4
             WHERE (SELECT COUNT(*) FROM room_members WHERE user_id = $2) < $5
               AND (SELECT COUNT(*) FROM room_members WHERE room_id = $1) < $6
             ON CONFLICT DO NOTHING",
        )
        .bind(room.to_string())
        .bind(user.to_string())
        .bind(role.as_str())
        .bind(now_millis())
        .bind(i64::from(self.caps.rooms_per_user))
        .bind(i64::from(self.caps.members_per_room))
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Ok(true));
        }
        if self.role_of(room, user).await?.is_ok() {
            return Ok(Ok(false));
        }
        let belongs: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM room_members WHERE user_id = $1")
                .bind(user.to_string())
                .fetch_one(&self.db.pool)
                .await?;
        Ok(Err(if belongs >= i64::from(self.caps.rooms_per_user) {
            Full::UserRooms(self.caps.rooms_per_user)
        } else {
            Full::RoomMembers(self.caps.members_per_room)
        }))
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

    /// Removes `user` from every room; the rooms it left.
    pub async fn remove_member_everywhere(&self, user: UserId) -> anyhow::Result<Vec<RoomId>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("DELETE FROM room_members WHERE user_id = $1 RETURNING room_id")
                .bind(user.to_string())
                .fetch_all(&self.db.pool)
                .await?;
        rows.iter().map(|(id,)| room_id(id)).collect()
    }

    /// The ids of the rooms each of `users` belongs to, in one query; users
    /// in no room are left out.
    pub async fn ids_of_members(&self, users: &[UserId]) -> anyhow::Result<Vec<UserRooms>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=users.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT user_id, room_id FROM room_members WHERE user_id IN ({}) ORDER BY user_id, room_id",
            placeholders.join(", ")
        );
        let mut query = sqlx::query_as::<_, (String, String)>(&sql);
        for user in users {
            query = query.bind(user.to_string());
        }
        let mut answer: Vec<UserRooms> = Vec::new();
        for (user, room) in query.fetch_all(&self.db.pool).await? {
            let user: UserId = user
                .parse()
                .with_context(|| format!("stored user id `{user}` is not a user id"))?;
            let room = room_id(&room)?;
            match answer.last_mut() {
                Some(last) if last.user == user => last.rooms.push(room),
                _ => answer.push(UserRooms {
                    user,
                    rooms: vec![room],
                }),
            }
        }
        Ok(answer)
    }
}
