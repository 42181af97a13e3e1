//! The chat repositories, one suite on SQLite and on Postgres: what one
//! dialect accepts the other must too, with the same results.

use chrono::Utc;
use unhidra_core::{
    events::RoomMessage,
    ids::{RoomId, UserId},
    rooms::{Role, Visibility},
};
use unhidra_store::Database;
use unhidra_testkit::{TestDatabase, on_each_database};

use crate::{
    MIGRATIONS, NAME,
    messages::OutboxRepo,
    rooms::{Refusal, Room, RoomRepo},
};

async fn open(db: &TestDatabase) -> anyhow::Result<Database> {
    let database = Database::connect(db.url(), 4).await?;
    database.migrate(NAME, MIGRATIONS).await?;
    Ok(database)
}

fn room(name: &str, visibility: Visibility) -> Room {
    Room {
        id: RoomId::new(),
        name: name.to_owned(),
        visibility,
    }
}

#[tokio::test]
async fn rooms_and_members() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let rooms = RoomRepo::new(open(&db).await?);
        let (owner, guest) = (UserId::new(), UserId::new());
        let hostile = room("'); DROP TABLE rooms; --", Visibility::Public);
        let private = room("private", Visibility::Private);
        rooms.create(&hostile, owner).await?;
        rooms.create(&private, owner).await?;

        assert_eq!(rooms.get(hostile.id).await?, Some(hostile.clone()));
        assert_eq!(rooms.get(RoomId::new()).await?, None);
        assert_eq!(rooms.role_of(hostile.id, owner).await?, Ok(Role::Owner));
        assert_eq!(
            rooms.role_of(hostile.id, guest).await?,
            Err(Refusal::NotAMember)
        );
        assert_eq!(
            rooms.role_of(RoomId::new(), guest).await?,
            Err(Refusal::NoSuchRoom)
        );

        assert!(rooms.add_member(hostile.id, guest, Role::Member).await?);
        assert!(!rooms.add_member(hostile.id, guest, Role::Member).await?);
        assert_eq!(rooms.role_of(hostile.id, guest).await?, Ok(Role::Member));

        let mut expected = vec![
            (hostile.clone(), Role::Owner),
            (private.clone(), Role::Owner),
        ];
        expected.sort_by_key(|(room, _)| room.id.to_string());
        assert_eq!(rooms.of_member(owner).await?, expected);
        assert_eq!(
            rooms.of_member(guest).await?,
            vec![(hostile.clone(), Role::Member)]
        );
        assert_eq!(rooms.ids_of_member(guest).await?, vec![hostile.id]);
        assert_eq!(rooms.ids_of_member(UserId::new()).await?, vec![]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unknown_roles_and_visibilities_are_errors() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone());
        let (owner, admin) = (UserId::new(), UserId::new());
        let odd = room("odd", Visibility::Public);
        rooms.create(&odd, owner).await?;
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES ($1, $2, 'admin', 0)",
        )
        .bind(odd.id.to_string())
        .bind(admin.to_string())
        .execute(&database.pool)
        .await?;
        let role = rooms.role_of(odd.id, admin).await;
        assert!(
            role.as_ref()
                .is_err_and(|e| e.to_string().contains("unknown role `admin`")),
            "{role:?}"
        );
        assert!(rooms.of_member(admin).await.is_err());

        sqlx::query("UPDATE rooms SET visibility = 'secret' WHERE id = $1")
            .bind(odd.id.to_string())
            .execute(&database.pool)
            .await?;
        let read = rooms.get(odd.id).await;
        assert!(
            read.as_ref()
                .is_err_and(|e| e.to_string().contains("unknown visibility `secret`")),
            "{read:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn accepted_messages_get_gap_free_sequences_per_room_and_wait_in_the_outbox()
-> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone());
        let outbox = OutboxRepo::new(database);
        let owner = UserId::new();
        let (a, b) = (room("a", Visibility::Public), room("b", Visibility::Public));
        rooms.create(&a, owner).await?;
        rooms.create(&b, owner).await?;

        // Concurrent senders in one room still get 1..=n without gaps.
        let mut tasks = Vec::new();
        for sender in 0..4 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..10 {
                    let (event, _) = outbox
                        .accept(a.id, owner, format!("{sender}/{i}"), Utc::now())
                        .await?;
                    seqs.push(event.seq);
                }
                anyhow::Ok(seqs)
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.extend(task.await??);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());

        let (first_of_b, pending) = outbox.accept(b.id, owner, "hi".into(), Utc::now()).await?;
        assert_eq!(first_of_b.seq, 1);
        let stored: RoomMessage = serde_json::from_str(&pending.payload)?;
        assert_eq!(stored, first_of_b);
        assert_eq!(
            (pending.room, pending.message_id),
            (b.id, first_of_b.message_id)
        );

        let waiting = outbox.unpublished(i64::MAX, 100).await?;
        assert_eq!(waiting.len(), 41);
        assert!(waiting.contains(&pending));
        assert_eq!(outbox.unpublished(0, 100).await?, vec![]);
        assert_eq!(outbox.unpublished(i64::MAX, 5).await?.len(), 5);
        outbox.published(first_of_b.message_id).await?;
        let waiting = outbox.unpublished(i64::MAX, 100).await?;
        assert_eq!(waiting.len(), 40);
        assert!(waiting.iter().all(|p| p.room == a.id));

        // A message to a room that does not exist is refused, not numbered.
        assert!(
            outbox
                .accept(RoomId::new(), owner, "lost".into(), Utc::now())
                .await
                .is_err()
        );
        Ok(())
    })
    .await
}
