//! The chat repositories, one suite on SQLite and on Postgres: what one
//! dialect accepts the other must too, with the same results.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;
use tokio::sync::oneshot;
use unhidra_core::{
    events::RoomMessage,
    ids::{MessageId, RoomId, UserId},
    rooms::{Role, Visibility},
    rpc::UserRooms,
};
use unhidra_store::{Backend, Database};
use unhidra_testkit::{TestDatabase, on_each_database};

use crate::{
    MIGRATIONS, NAME,
    messages::{Accepted, NewMessage, OutboxRepo},
    rooms::{Caps, Full, Refusal, Room, RoomRepo},
};

const ROOMY: Caps = Caps {
    rooms_per_user: 1000,
    members_per_room: 1000,
};

async fn open(db: &TestDatabase) -> anyhow::Result<Database> {
    crate::bench::open(db.url()).await
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
        let rooms = RoomRepo::new(open(&db).await?, ROOMY);
        let (owner, guest) = (UserId::new(), UserId::new());
        let hostile = room("'); DROP TABLE rooms; --", Visibility::Public);
        let private = room("private", Visibility::Private);
        rooms.create(&hostile, owner).await??;
        rooms.create(&private, owner).await??;

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

        assert_eq!(
            rooms.add_member(hostile.id, guest, Role::Member).await?,
            Ok(true)
        );
        assert_eq!(
            rooms.add_member(hostile.id, guest, Role::Member).await?,
            Ok(false)
        );
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
        let mut owned = vec![hostile.id, private.id];
        owned.sort_by_key(ToString::to_string);
        let mut asked = vec![guest, UserId::new(), owner];
        asked.sort_by_key(ToString::to_string);
        let mut expected = vec![
            UserRooms {
                user: guest,
                rooms: vec![hostile.id],
            },
            UserRooms {
                user: owner,
                rooms: owned,
            },
        ];
        expected.sort_by_key(|u| u.user.to_string());
        assert_eq!(rooms.ids_of_members(&asked).await?, expected);
        assert_eq!(rooms.ids_of_members(&[UserId::new()]).await?, vec![]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn rooms_per_user_and_members_per_room_are_capped() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let caps = Caps {
            rooms_per_user: 2,
            members_per_room: 3,
        };
        let rooms = RoomRepo::new(open(&db).await?, caps);
        let ann = UserId::new();
        let (first, second, third) = (
            room("first", Visibility::Public),
            room("second", Visibility::Public),
            room("third", Visibility::Public),
        );
        rooms.create(&first, ann).await??;
        rooms.create(&second, ann).await??;
        assert_eq!(rooms.create(&third, ann).await?, Err(Full::UserRooms(2)));
        assert_eq!(rooms.get(third.id).await?, None, "nothing stored");

        let bob = UserId::new();
        rooms.create(&third, bob).await??;
        assert_eq!(
            rooms.add_member(third.id, ann, Role::Member).await?,
            Err(Full::UserRooms(2)),
            "ann is in two rooms already"
        );
        for guest in [UserId::new(), UserId::new()] {
            assert_eq!(
                rooms.add_member(third.id, guest, Role::Member).await?,
                Ok(true)
            );
        }
        assert_eq!(
            rooms
                .add_member(third.id, UserId::new(), Role::Member)
                .await?,
            Err(Full::RoomMembers(3))
        );
        assert_eq!(
            rooms.add_member(third.id, bob, Role::Member).await?,
            Ok(false),
            "a member joining again is no refusal"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unknown_roles_and_visibilities_are_errors() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let (owner, admin) = (UserId::new(), UserId::new());
        let odd = room("odd", Visibility::Public);
        rooms.create(&odd, owner).await??;
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

/// How long send keys are kept in these suites.
const KEYS_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

fn new_message(room: RoomId, sender: UserId, body: &str) -> NewMessage {
    NewMessage {
        room,
        sender,
        body: body.to_owned(),
        sent_at: Utc::now(),
        client_id: None,
    }
}

/// The new message an outcome posted.
fn posted(outcome: Result<Accepted, Refusal>) -> Result<RoomMessage, Refusal> {
    match outcome? {
        Accepted::New(event) => Ok(event),
        Accepted::Repeat(ack) => panic!("a repeat where a new message was expected: {ack:?}"),
    }
}

#[tokio::test]
async fn groups_get_gap_free_sequences_in_order_and_refusals_take_none() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database, KEYS_KEPT);
        let (owner, stranger) = (UserId::new(), UserId::new());
        let (a, b) = (room("a", Visibility::Public), room("b", Visibility::Public));
        rooms.create(&a, owner).await??;
        rooms.create(&b, owner).await??;

        // Concurrent groups into one room: 1..=200 without gaps, each group
        // numbered in the order given.
        let mut tasks = Vec::new();
        for sender in 0..4 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for group in 0..10 {
                    let messages = (0..5)
                        .map(|i| new_message(a.id, owner, &format!("{sender}/{group}/{i}")))
                        .collect();
                    let numbered: Vec<u64> = outbox
                        .accept(messages, &BTreeMap::new())
                        .await?
                        .outcomes
                        .into_iter()
                        .map(|o| posted(o).map(|e| e.seq))
                        .collect::<Result<_, _>>()
                        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
                    assert!(
                        numbered.windows(2).all(|w| w[1] == w[0] + 1),
                        "{numbered:?}"
                    );
                    seqs.extend(numbered);
                }
                anyhow::Ok(seqs)
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.extend(task.await??);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());

        // One group over two rooms, with refusals in between.
        let outcomes = outbox
            .accept(
                vec![
                    new_message(b.id, owner, "b1"),
                    new_message(RoomId::new(), owner, "nowhere"),
                    new_message(a.id, stranger, "not a member"),
                    new_message(a.id, owner, "a201"),
                    new_message(b.id, owner, "b2"),
                ],
                &BTreeMap::new(),
            )
            .await?;
        // Queued for the publisher: the new messages, as their events.
        let queued: Vec<(RoomId, u64, RoomMessage)> = outcomes
            .queued
            .iter()
            .map(|p| Ok((p.room, p.seq, serde_json::from_str(&p.payload)?)))
            .collect::<anyhow::Result<_>>()?;
        let posted_events: Vec<(RoomId, u64, RoomMessage)> = outcomes
            .outcomes
            .iter()
            .filter_map(|o| match o {
                Ok(Accepted::New(e)) => Some((e.room, e.seq, e.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(queued, posted_events);
        let summary: Vec<Result<(RoomId, u64, String), Refusal>> = outcomes
            .outcomes
            .into_iter()
            .map(|o| posted(o).map(|e| (e.room, e.seq, e.body)))
            .collect();
        assert_eq!(
            summary,
            vec![
                Ok((b.id, 1, "b1".into())),
                Err(Refusal::NoSuchRoom),
                Err(Refusal::NotAMember),
                Ok((a.id, 201, "a201".into())),
                Ok((b.id, 2, "b2".into())),
            ]
        );
        Ok(())
    })
    .await
}

/// A group's rooms are listed padded to a power of two (copies of the last
/// room): each room is still numbered once, by its own count.
#[tokio::test]
async fn a_group_over_five_rooms_numbers_each_room_by_its_own_count() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database.clone(), KEYS_KEPT);
        let owner = UserId::new();
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = room(&format!("r{i}"), Visibility::Public);
            rooms.create(&r, owner).await??;
            ids.push(r.id);
        }
        // Room i gets i + 1 messages in each of two groups.
        for group in 0..2u64 {
            let messages = ids
                .iter()
                .enumerate()
                .flat_map(|(i, room)| (0..=i).map(move |_| new_message(*room, owner, "m")))
                .collect();
            let acceptance = outbox.accept(messages, &BTreeMap::new()).await?;
            let mut numbered: BTreeMap<RoomId, Vec<u64>> = BTreeMap::new();
            for outcome in acceptance.outcomes {
                let event = posted(outcome).map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
                numbered.entry(event.room).or_default().push(event.seq);
            }
            for (i, room) in ids.iter().enumerate() {
                let count = i as u64 + 1;
                let first = group * count + 1;
                let expected: Vec<u64> = (first..first + count).collect();
                assert_eq!(
                    numbered.get(room),
                    Some(&expected),
                    "room {i}, group {group}"
                );
            }
        }
        for (i, room) in ids.iter().enumerate() {
            let last: i64 = sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1")
                .bind(room.to_string())
                .fetch_one(&database.pool)
                .await?;
            assert_eq!(last, 2 * (i as i64 + 1));
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn publishing_takes_each_room_in_sequence_order_and_keeps_what_failed() -> anyhow::Result<()>
{
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database, KEYS_KEPT);
        let owner = UserId::new();
        let (a, b) = (room("a", Visibility::Public), room("b", Visibility::Public));
        rooms.create(&a, owner).await??;
        rooms.create(&b, owner).await??;
        let mut messages = Vec::new();
        for i in 0..30 {
            messages.push(new_message(a.id, owner, &format!("a{i}")));
            messages.push(new_message(b.id, owner, &format!("b{i}")));
        }
        let events: Vec<RoomMessage> = outbox
            .accept(messages, &BTreeMap::new())
            .await?
            .outcomes
            .into_iter()
            .filter_map(|o| posted(o).ok())
            .collect();
        assert_eq!(outbox.stale_rooms(0, 100).await?, vec![]);
        let mut stale = outbox.stale_rooms(i64::MAX, 100).await?;
        stale.sort();
        let mut both = vec![a.id, b.id];
        both.sort();
        assert_eq!(stale, both);

        // A failed publish leaves everything in place.
        let failed = outbox
            .publish(&[a.id], 100, |_| async { anyhow::bail!("stream down") })
            .await;
        assert!(failed.is_err());

        // The lowest sequences of the room come first, sorted, as stored.
        let mut seen = Vec::new();
        let count = outbox
            .publish(&[a.id], 20, |pending| {
                seen = pending;
                async { Ok(()) }
            })
            .await?;
        assert_eq!(count, 20);
        assert_eq!(
            seen.iter().map(|p| p.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<u64>>()
        );
        let first: RoomMessage = serde_json::from_str(&seen[0].payload)?;
        assert_eq!(
            Some(&first),
            events.iter().find(|e| e.room == a.id && e.seq == 1)
        );
        let rest = outbox
            .publish(&[a.id, b.id], 100, |pending| {
                seen = pending;
                async { Ok(()) }
            })
            .await?;
        assert_eq!(rest, 40);
        let order: Vec<(RoomId, u64)> = seen.iter().map(|p| (p.room, p.seq)).collect();
        let mut expected: Vec<(RoomId, u64)> = (21..=30).map(|s| (a.id, s)).collect();
        expected.extend((1..=30).map(|s| (b.id, s)));
        expected.sort();
        assert_eq!(order, expected);
        assert_eq!(
            outbox
                .publish(&[a.id, b.id], 100, |_| async { Ok(()) })
                .await?,
            0
        );
        assert_eq!(outbox.stale_rooms(i64::MAX, 10).await?, vec![]);
        Ok(())
    })
    .await
}

/// A removal takes each room's rows through the sequence given, whatever
/// this or another process removed of the room before; the relay finds the
/// rooms of the oldest rows first.
#[tokio::test]
async fn removals_take_what_is_left_through_each_given_sequence() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database.clone(), KEYS_KEPT);
        let owner = UserId::new();
        let (a, b) = (room("a", Visibility::Public), room("b", Visibility::Public));
        rooms.create(&a, owner).await??;
        rooms.create(&b, owner).await??;
        let messages = (0..10)
            .flat_map(|i| [a.id, b.id].map(|r| new_message(r, owner, &format!("m{i}"))))
            .collect();
        outbox.accept(messages, &BTreeMap::new()).await?;
        // A row a crash left long ago, in a room of its own.
        let old = RoomId::new();
        sqlx::query(
            "INSERT INTO outbox (message_id, room_id, seq, payload, created_at)
             VALUES ($1, $2, 1, 'old', 1)",
        )
        .bind(MessageId::new().to_string())
        .bind(old.to_string())
        .execute(&database.pool)
        .await?;
        assert_eq!(outbox.stale_rooms(i64::MAX, 1).await?, vec![old]);

        let queued = || async {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT room_id, seq FROM outbox ORDER BY room_id, seq")
                    .fetch_all(&database.pool)
                    .await?;
            let rows: Vec<(RoomId, u64)> = rows
                .into_iter()
                .map(|(room, seq)| Ok((room.parse()?, u64::try_from(seq)?)))
                .collect::<anyhow::Result<_>>()?;
            anyhow::Ok(rows)
        };
        let of = |room: RoomId, seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(move |seq| (room, seq)).collect::<Vec<_>>()
        };
        outbox
            .remove(&BTreeMap::from([(a.id, 4), (b.id, 10), (old, 1)]))
            .await?;
        assert_eq!(queued().await?, of(a.id, 5..=10));
        // Another process, which removed nothing of the room before.
        let other = OutboxRepo::new(database.clone(), KEYS_KEPT);
        other.remove(&BTreeMap::from([(a.id, 7)])).await?;
        assert_eq!(queued().await?, of(a.id, 8..=10));
        // Below what this one removed: nothing.
        outbox.remove(&BTreeMap::from([(a.id, 3)])).await?;
        assert_eq!(queued().await?, of(a.id, 8..=10));
        // Above it: the rest, including what the other removed meanwhile.
        outbox.remove(&BTreeMap::from([(a.id, 9)])).await?;
        assert_eq!(queued().await?, of(a.id, 10..=10));
        let mut seen = Vec::new();
        outbox
            .publish(&[a.id], 10, |pending| {
                seen = pending.into_iter().map(|p| p.seq).collect();
                async { Ok(()) }
            })
            .await?;
        assert_eq!(seen, vec![10]);
        assert_eq!(queued().await?, vec![]);
        assert_eq!(outbox.stale_rooms(i64::MAX, 10).await?, vec![]);
        Ok(())
    })
    .await
}

/// Messages queued before the outbox was keyed by room and sequence are
/// still queued after, and published in order.
#[tokio::test]
async fn queued_messages_survive_the_outbox_rebuild() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = Database::connect(db.url(), 4).await?;
        let before = MIGRATIONS.iter().position(|m| m.version == 5).unwrap_or(0);
        database.migrate(NAME, &MIGRATIONS[..before]).await?;
        let room = RoomId::new();
        for seq in [2_i64, 1] {
            sqlx::query(
                "INSERT INTO outbox (message_id, room_id, seq, payload, created_at)
                 VALUES ($1, $2, $3, $4, 0)",
            )
            .bind(MessageId::new().to_string())
            .bind(room.to_string())
            .bind(seq)
            .bind(format!("payload {seq}"))
            .execute(&database.pool)
            .await?;
        }
        database.migrate(NAME, MIGRATIONS).await?;
        let outbox = OutboxRepo::new(database, KEYS_KEPT);
        assert_eq!(outbox.stale_rooms(1, 10).await?, vec![room]);
        let mut seen = Vec::new();
        outbox
            .publish(&[room], 10, |pending| {
                seen = pending.into_iter().map(|p| (p.seq, p.payload)).collect();
                async { Ok(()) }
            })
            .await?;
        assert_eq!(
            seen,
            vec![(1, "payload 1".to_owned()), (2, "payload 2".to_owned())]
        );
        Ok(())
    })
    .await
}

/// Stores `user`'s send key `c-1` for `message`, numbered 7, in `send_keys`
/// (as another Postgres instance, or a version before the send log, does).
async fn store_key_seven<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    user: UserId,
    message: MessageId,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO send_keys (user_id, client_id, seq, message_id, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user.to_string())
    .bind("c-1")
    .bind(7_i64)
    .bind(message.to_string())
    .bind(unhidra_store::now_millis())
    .execute(db)
    .await?;
    Ok(())
}

/// A group of one send answered with the first ack of [`store_key_seven`].
fn assert_repeat_of_seven(outcomes: &[Result<Accepted, Refusal>], first: MessageId) {
    assert!(
        matches!(outcomes, [Ok(Accepted::Repeat(ack))] if ack.seq == 7 && ack.message_id == first),
        "{outcomes:?}"
    );
}

/// Keys stored before the send log (migration 6, SQLite only) are still
/// found after it: a retry of a send from before the upgrade posts nothing.
#[tokio::test]
async fn send_keys_stored_before_the_send_log_are_kept() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = Database::connect(db.url(), 4).await?;
        let before = MIGRATIONS.iter().position(|m| m.version == 6).unwrap_or(0);
        database.migrate(NAME, &MIGRATIONS[..before]).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let alice = UserId::new();
        let a = room("a", Visibility::Public);
        rooms.create(&a, alice).await??;
        let first = MessageId::new();
        store_key_seven(&database.pool, alice, first).await?;
        database.migrate(NAME, MIGRATIONS).await?;
        let outbox = OutboxRepo::new(database, KEYS_KEPT);
        let retry = NewMessage {
            client_id: Some("c-1".to_owned()),
            ..new_message(a.id, alice, "hello")
        };
        let retried = outbox.accept(vec![retry], &BTreeMap::new()).await?;
        assert!(
            retried.queued.is_empty(),
            "posted again: {:?}",
            retried.queued
        );
        assert_repeat_of_seven(&retried.outcomes, first);
        Ok(())
    })
    .await
}

/// Two publishers of one room at once (the relay and the publisher, or two
/// instances). On Postgres the second waits for the first and takes what is
/// left; on SQLite it does not wait (the first holds nothing), and a stream
/// that stores each message id once still receives the room in order.
#[tokio::test]
async fn racing_publishers_keep_a_rooms_order() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let postgres = database.backend == Backend::Postgres;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database, KEYS_KEPT);
        let owner = UserId::new();
        let a = room("a", Visibility::Public);
        rooms.create(&a, owner).await??;
        let burst = |from: usize| {
            (from..from + 10)
                .map(|i| new_message(a.id, owner, &format!("m{i}")))
                .collect::<Vec<_>>()
        };
        outbox.accept(burst(1), &BTreeMap::new()).await?;

        // The stream: each message id stored once, in arrival order.
        let stream: Arc<Mutex<Vec<(MessageId, u64)>>> = Arc::default();
        let store = |pending: Vec<(MessageId, u64)>| {
            let mut stored = stream.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, seq) in pending {
                if !stored.iter().any(|(known, _)| *known == id) {
                    stored.push((id, seq));
                }
            }
        };
        let only_a = [a.id];
        let (read, has_read) = oneshot::channel();
        let (go_on, told) = oneshot::channel::<()>();
        let slow = outbox.publish(&only_a, 100, |pending| async move {
            let _ = read.send(());
            let _ = told.await;
            store(pending.iter().map(|p| (p.message_id, p.seq)).collect());
            Ok(())
        });
        let meanwhile = async {
            has_read.await?;
            // More messages and a second publisher, while the first one's
            // publish waits.
            let second = async {
                outbox.accept(burst(11), &BTreeMap::new()).await?;
                outbox
                    .publish(&only_a, 100, |pending| async move {
                        store(pending.iter().map(|p| (p.message_id, p.seq)).collect());
                        Ok(())
                    })
                    .await
            };
            tokio::pin!(second);
            let patience = Duration::from_secs(if postgres { 1 } else { 10 });
            let while_held = tokio::time::timeout(patience, &mut second).await;
            let _ = go_on.send(());
            match (postgres, while_held) {
                (false, Ok(published)) => published,
                (false, Err(_)) => anyhow::bail!("the second publisher waited for the first"),
                (true, Ok(_)) => anyhow::bail!("the second publisher took locked messages"),
                (true, Err(_)) => second.await,
            }
        };
        let (slow, fast) = tokio::join!(slow, meanwhile);
        let second_took = if postgres { 10 } else { 20 };
        assert_eq!((slow?, fast?), (10, second_took));
        let stored: Vec<u64> = stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, seq)| *seq)
            .collect();
        assert_eq!(stored, (1..=20).collect::<Vec<u64>>());
        assert_eq!(outbox.publish(&[a.id], 100, |_| async { Ok(()) }).await?, 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_repeated_client_id_gets_the_first_ack_and_posts_nothing() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database.clone(), KEYS_KEPT);
        let (alice, bob) = (UserId::new(), UserId::new());
        let a = room("a", Visibility::Public);
        rooms.create(&a, alice).await??;
        rooms.add_member(a.id, bob, unhidra_core::rooms::Role::Member).await??;
        let keyed = |sender, id: &str, body: &str| NewMessage {
            client_id: Some(id.to_owned()),
            ..new_message(a.id, sender, body)
        };

        let first = outbox.accept(vec![keyed(alice, "c-1", "hello")], &BTreeMap::new()).await?;
        let Some(Ok(Accepted::New(posted_first))) = first.outcomes.into_iter().next() else {
            anyhow::bail!("the first send was not posted");
        };
        // Retried alone, twice in one group, and the same id from bob.
        let again = outbox
            .accept(vec![
                keyed(alice, "c-1", "hello"),
                keyed(alice, "c-2", "second"),
                keyed(alice, "c-2", "second"),
                keyed(bob, "c-1", "bob's own"),
            ], &BTreeMap::new())
            .await?;
        let queued: Vec<u64> = again.queued.iter().map(|p| p.seq).collect();
        assert_eq!(queued, vec![2, 3], "repeats are not queued again");
        let again = again.outcomes;
        let acks: Vec<(bool, u64)> = again
            .iter()
            .map(|o| match o {
                Ok(Accepted::New(e)) => Ok((true, e.seq)),
                Ok(Accepted::Repeat(ack)) => Ok((false, ack.seq)),
                Err(r) => Err(anyhow::anyhow!("refused: {r:?}")),
            })
            .collect::<Result<_, _>>()?;
        assert_eq!(acks, vec![(false, 1), (true, 2), (false, 2), (true, 3)]);
        assert!(matches!(&again[0], Ok(Accepted::Repeat(ack)) if ack.message_id == posted_first.message_id));

        // Three messages in the room, not five.
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&database.pool)
            .await?;
        assert_eq!(queued, 3);

        // Past their time, ids post anew: a key not swept yet is replaced,
        // then the keys are swept (on Postgres the three keys; on SQLite's
        // log the four rows but its highest, kept so that ids given later
        // stay above it).
        let forgetful = OutboxRepo::new(database, std::time::Duration::ZERO);
        let fresh = forgetful.accept(vec![keyed(alice, "c-2", "second again")], &BTreeMap::new()).await?;
        assert!(matches!(&fresh.outcomes[0], Ok(Accepted::New(e)) if e.seq == 4));
        assert_eq!(forgetful.forget_old_keys().await?, 3);
        let fresh = forgetful.accept(vec![keyed(alice, "c-1", "hello again")], &BTreeMap::new()).await?;
        assert!(matches!(&fresh.outcomes[0], Ok(Accepted::New(e)) if e.seq == 5));
        Ok(())
    })
    .await
}

/// A retry that reaches another instance (on SQLite another process on the
/// same file, with an index of its own), or the same one after a restart,
/// gets the first ack and posts nothing; so does one after the old keys
/// were swept, through an instance started after the sweep.
#[tokio::test]
async fn a_retry_through_another_instance_or_a_restart_gets_the_first_ack() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let instance = || async { anyhow::Ok(OutboxRepo::new(open(&db).await?, KEYS_KEPT)) };
        let (one, other) = (instance().await?, instance().await?);
        let rooms = RoomRepo::new(open(&db).await?, ROOMY);
        let alice = UserId::new();
        let a = room("a", Visibility::Public);
        rooms.create(&a, alice).await??;
        let sends = |ids: &[&str]| -> Vec<NewMessage> {
            ids.iter()
                .map(|id| NewMessage {
                    client_id: Some((*id).to_owned()),
                    ..new_message(a.id, alice, id)
                })
                .collect()
        };

        let first = acks(&one, sends(&["c-1"])).await?;
        let [("new", 1, c1)] = first[..] else {
            anyhow::bail!("{first:?}");
        };
        let second = acks(&other, sends(&["c-2", "c-1"])).await?;
        let [("new", 2, c2), ("repeat", 1, again)] = second[..] else {
            anyhow::bail!("{second:?}");
        };
        assert_eq!(again, c1);
        // The first instance learns the other's key.
        let third = acks(&one, sends(&["c-2", "c-3"])).await?;
        let [("repeat", 2, again), ("new", 3, c3)] = third[..] else {
            anyhow::bail!("{third:?}");
        };
        assert_eq!(again, c2);

        let restarted = instance().await?;
        let fourth = acks(&restarted, sends(&["c-1", "c-3"])).await?;
        assert_eq!(fourth, vec![("repeat", 1, c1), ("repeat", 3, c3)]);
        // Kept keys outlive a sweep.
        assert_eq!(restarted.forget_old_keys().await?, 0);
        let kept = acks(&restarted, sends(&["c-2"])).await?;
        assert_eq!(kept, vec![("repeat", 2, c2)]);

        // Swept, all keys are forgotten (on SQLite all but the last row);
        // an instance started after the sweep stores its keys where the
        // others find them.
        let database = open(&db).await?;
        let swept = match database.backend {
            Backend::Sqlite => 2,
            Backend::Postgres => 3,
        };
        let forgetful = OutboxRepo::new(database, Duration::ZERO);
        forgetful.read_send_log().await?;
        assert_eq!(forgetful.forget_old_keys().await?, swept);
        let late = instance().await?;
        let fifth = acks(&late, sends(&["c-4"])).await?;
        let [("new", 4, c4)] = fifth[..] else {
            anyhow::bail!("{fifth:?}");
        };
        assert_eq!(acks(&one, sends(&["c-4"])).await?, vec![("repeat", 4, c4)]);
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&open(&db).await?.pool)
            .await?;
        assert_eq!(queued, 4);
        Ok(())
    })
    .await
}

/// `outbox`'s answer to `messages` as one group: for each, "new" or
/// "repeat", its sequence and its message id.
async fn acks(
    outbox: &OutboxRepo,
    messages: Vec<NewMessage>,
) -> anyhow::Result<Vec<(&'static str, u64, MessageId)>> {
    outbox
        .accept(messages, &BTreeMap::new())
        .await?
        .outcomes
        .into_iter()
        .map(|o| match o {
            Ok(Accepted::New(e)) => Ok(("new", e.seq, e.message_id)),
            Ok(Accepted::Repeat(ack)) => Ok(("repeat", ack.seq, ack.message_id)),
            Err(r) => Err(anyhow::anyhow!("refused: {r:?}")),
        })
        .collect()
}

/// A group larger than one statement's rows (512), every other send
/// keyed: its keys and its outbox rows come in chunks that do not line up,
/// and a repeat in its last chunk still makes the group look repeats up.
#[tokio::test]
async fn a_group_of_many_statements_keeps_every_key_and_message() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database.clone(), KEYS_KEPT);
        let alice = UserId::new();
        let a = room("a", Visibility::Public);
        rooms.create(&a, alice).await??;
        let send = |i: usize| NewMessage {
            client_id: (i % 2 == 0).then(|| format!("c-{i}")),
            ..new_message(a.id, alice, &format!("m{i}"))
        };
        let count = |sql: &'static str| {
            let pool = database.pool.clone();
            async move { anyhow::Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await?) }
        };
        let keys_stored = match database.backend {
            Backend::Sqlite => "SELECT COUNT(*) FROM send_log",
            Backend::Postgres => "SELECT COUNT(*) FROM send_keys",
        };

        let first = outbox
            .accept((0..1100).map(send).collect(), &BTreeMap::new())
            .await?;
        let seqs: Vec<u64> = first.queued.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, (1..=1100).collect::<Vec<u64>>());
        assert_eq!(count("SELECT COUNT(*) FROM outbox").await?, 1100);
        assert_eq!(count(keys_stored).await?, 550);

        // 1,100 new sends, then one sent before (message 1098, seq 1099).
        let again: Vec<NewMessage> = (1100..2200).chain([1098]).map(send).collect();
        let again = outbox.accept(again, &BTreeMap::new()).await?;
        assert_eq!(again.queued.len(), 1100);
        assert_eq!(again.queued.last().map(|p| p.seq), Some(2200));
        assert!(
            matches!(again.outcomes.last(), Some(Ok(Accepted::Repeat(ack))) if ack.seq == 1099),
            "{:?}",
            again.outcomes.last()
        );
        assert_eq!(count("SELECT COUNT(*) FROM outbox").await?, 2200);
        assert_eq!(count(keys_stored).await?, 1100);
        Ok(())
    })
    .await
}

/// The same send given to two instances at once (a retry reaching another
/// instance while the first is still committing it): the retry waits for
/// the first's key, then answers with its ack and posts nothing.
#[tokio::test]
async fn a_retry_racing_its_first_send_on_another_instance_posts_nothing() -> anyhow::Result<()> {
    on_each_database(|db| async move {
        let database = open(&db).await?;
        if database.backend != Backend::Postgres {
            // One writer at a time: the first send commits before a retry starts.
            return Ok(());
        }
        let rooms = RoomRepo::new(database.clone(), ROOMY);
        let outbox = OutboxRepo::new(database.clone(), KEYS_KEPT);
        let alice = UserId::new();
        let a = room("a", Visibility::Public);
        rooms.create(&a, alice).await??;
        let send = || NewMessage {
            client_id: Some("c-1".to_owned()),
            ..new_message(a.id, alice, "hello")
        };

        // The other instance's group: its key written, not yet committed.
        let first = MessageId::new();
        let mut elsewhere = database.pool.begin().await?;
        store_key_seven(&mut *elsewhere, alice, first).await?;
        let nothing_published = BTreeMap::new();
        let retry = outbox.accept(vec![send()], &nothing_published);
        tokio::pin!(retry);
        let early = tokio::time::timeout(Duration::from_millis(300), &mut retry).await;
        assert!(
            early.is_err(),
            "answered past an uncommitted key: {early:?}"
        );
        elsewhere.commit().await?;

        let retried = retry.await?;
        assert!(
            retried.queued.is_empty(),
            "posted again: {:?}",
            retried.queued
        );
        assert_repeat_of_seven(&retried.outcomes, first);
        // Nothing numbered meanwhile: the room's next message is its first.
        let next = outbox
            .accept(vec![new_message(a.id, alice, "next")], &BTreeMap::new())
            .await?;
        assert_eq!(
            next.queued.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![1]
        );
        Ok(())
    })
    .await
}
