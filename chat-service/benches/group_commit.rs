//! The group commit: one transaction accepting a group of sends (the
//! membership and repeat checks, each room's sequence, the send keys and the
//! outbox rows), on SQLite and, when it answers, on Postgres. Between two
//! measured groups the outbox is emptied as the publisher would (not
//! measured), so every group meets tables of the same size.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use chat_service::bench::{Caps, NewMessage, OutboxRepo, Room, RoomRepo, open};
use chrono::Utc;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use unhidra_core::{
    ids::{RoomId, UserId},
    rooms::Visibility,
};
use unhidra_testkit::TestDatabase;

/// Rooms the sends go to, one sender each.
const ROOMS: usize = 100;

/// A database with `ROOMS` rooms, each with its sender as its member.
struct Fixture {
    outbox: OutboxRepo,
    rooms: Vec<(RoomId, UserId)>,
    sent: u64,
    _db: TestDatabase,
}

impl Fixture {
    async fn new(db: TestDatabase) -> anyhow::Result<Self> {
        let database = open(db.url()).await?;
        let caps = Caps {
            rooms_per_user: 1000,
            members_per_room: 1000,
        };
        let repo = RoomRepo::new(database.clone(), caps);
        let mut rooms = Vec::with_capacity(ROOMS);
        for i in 0..ROOMS {
            let (room, sender) = (RoomId::new(), UserId::new());
            let stored = Room {
                id: room,
                name: format!("bench {i}"),
                visibility: Visibility::Public,
            };
            repo.create(&stored, sender).await??;
            rooms.push((room, sender));
        }
        Ok(Self {
            outbox: OutboxRepo::new(database, Duration::from_secs(3600)),
            rooms,
            sent: 0,
            _db: db,
        })
    }

    /// `size` new sends, spread over the rooms in turn.
    fn group(&mut self, size: usize) -> Vec<NewMessage> {
        (0..size)
            .map(|i| {
                self.sent += 1;
                let (room, sender) = self.rooms[i % ROOMS];
                NewMessage {
                    room,
                    sender,
                    body: "x".repeat(100),
                    sent_at: Utc::now(),
                    client_id: Some(format!("c-{}", self.sent)),
                }
            })
            .collect()
    }

    /// Accepts `iters` groups of `size`; the time spent accepting them.
    async fn measure(&mut self, iters: u64, size: usize) -> anyhow::Result<Duration> {
        let rooms: Vec<RoomId> = self.rooms.iter().map(|(room, _)| *room).collect();
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let group = self.group(size);
            let started = Instant::now();
            let outcomes = self.outbox.accept(group, &BTreeMap::new()).await?.outcomes;
            total += started.elapsed();
            anyhow::ensure!(
                outcomes.iter().all(Result::is_ok),
                "a send of the group was refused"
            );
            self.outbox
                .publish(&rooms, 2 * size, |_| async { Ok(()) })
                .await?;
        }
        Ok(total)
    }
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut databases = vec![
        runtime
            .block_on(TestDatabase::sqlite())
            .expect("a SQLite file"),
    ];
    databases.extend(
        runtime
            .block_on(TestDatabase::postgres())
            .expect("Postgres"),
    );
    let mut group = c.benchmark_group("group commit");
    for db in databases {
        let backend = db.backend();
        let mut fixture = runtime.block_on(Fixture::new(db)).expect("the rooms");
        for size in [1, 64, 512] {
            group.bench_with_input(BenchmarkId::new(backend, size), &size, |b, &size| {
                b.iter_custom(|iters| {
                    runtime
                        .block_on(fixture.measure(iters, size))
                        .expect("a group accepted")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
