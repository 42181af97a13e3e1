//! The rooms of connecting users, asked of chat-service in batches: the users
//! whose connections open while one `chat.rooms_of` is answered are asked
//! about together in the next, so a burst of connects costs a few requests
//! (and database queries), not one each. An idle gateway asks at once. An
//! ask waits at most the bus timeout, wherever it stands in the queue.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use unhidra_bus::RpcClient;
use unhidra_core::{
    events::SCHEMA_VERSION,
    ids::{RoomId, UserId},
    rpc::{MAX_USERS_PER_ROOMS_OF, RoomsOf, RoomsOfRequest, RpcCode, RpcError},
};
use unhidra_runtime::batch::next_batch;

/// Connections waiting for their rooms before new ones wait to be queued.
const WAITING: usize = 4096;

type Answer = Result<Vec<RoomId>, RpcError>;

struct Ask {
    user: UserId,
    answer: oneshot::Sender<Answer>,
}

/// Asks for the rooms of users; clones share one batching task.
#[derive(Clone)]
pub struct RoomsLoader {
    asks: mpsc::Sender<Ask>,
    timeout: Duration,
}

impl RoomsLoader {
    /// Starts the batching task; it stops at `shutdown`. An ask not
    /// answered within `timeout` is answered `unavailable`.
    pub fn start(
        rpc: RpcClient,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (asks, queue) = mpsc::channel(WAITING);
        let loader = Self { asks, timeout };
        (loader, tokio::spawn(ask_in_batches(rpc, queue, shutdown)))
    }

    /// The rooms `user` belongs to now.
    pub async fn rooms_of(&self, user: UserId) -> Answer {
        let unavailable = || RpcError::new(RpcCode::Unavailable, "rooms unavailable");
        let (answer, answered) = oneshot::channel();
        let asked = async {
            self.asks
                .send(Ask { user, answer })
                .await
                .map_err(|_| unavailable())?;
            answered.await.map_err(|_| unavailable())?
        };
        tokio::time::timeout(self.timeout, asked)
            .await
            .unwrap_or_else(|_| Err(unavailable()))
    }
}

/// One `chat.rooms_of` at a time, for everyone who asked meanwhile.
async fn ask_in_batches(
    rpc: RpcClient,
    mut queue: mpsc::Receiver<Ask>,
    shutdown: CancellationToken,
) {
    loop {
        let mut users: HashSet<UserId> = HashSet::new();
        let Some(batch) = next_batch(&mut queue, &shutdown, |ask: &Ask| {
            users.insert(ask.user);
            users.len() >= MAX_USERS_PER_ROOMS_OF
        })
        .await
        else {
            return;
        };
        let request = RoomsOfRequest {
            v: SCHEMA_VERSION,
            users: users.into_iter().collect(),
        };
        match rpc.call::<RoomsOf>(&request).await {
            Ok(answer) => {
                let mut rooms: HashMap<UserId, Vec<RoomId>> = HashMap::new();
                for of in answer {
                    rooms.entry(of.user).or_default().extend(of.rooms);
                }
                for ask in batch {
                    let theirs = rooms.get(&ask.user).cloned().unwrap_or_default();
                    let _ = ask.answer.send(Ok(theirs));
                }
            }
            Err(e) => {
                for ask in batch {
                    let _ = ask.answer.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::sync::Semaphore;
    use unhidra_core::{Config, rpc::UserRooms};
    use unhidra_runtime::{ServiceContext, rpc::respond};

    use super::*;

    #[tokio::test]
    async fn users_asking_while_a_request_is_answered_are_asked_about_together()
    -> anyhow::Result<()> {
        let ctx =
            ServiceContext::connect("test", Config::default(), std::future::pending()).await?;
        let asked: Arc<Mutex<Vec<Vec<UserId>>>> = Arc::default();
        // Each request is answered once the test lets it: every user but
        // the last is in one room of their own.
        let gate = Arc::new(Semaphore::new(0));
        let users: Vec<UserId> = (0..10).map(|_| UserId::new()).collect();
        let rooms: HashMap<UserId, RoomId> = users[..9]
            .iter()
            .map(|user| (*user, RoomId::new()))
            .collect();
        {
            let (asked, gate, rooms) = (Arc::clone(&asked), Arc::clone(&gate), rooms.clone());
            respond::<RoomsOf, _, _>(&ctx, "test", move |request| {
                let (asked, gate, rooms) = (Arc::clone(&asked), Arc::clone(&gate), rooms.clone());
                async move {
                    asked.lock().expect("asked").push(request.users.clone());
                    gate.acquire().await.expect("gate").forget();
                    Ok(request
                        .users
                        .iter()
                        .filter_map(|user| {
                            Some(UserRooms {
                                user: *user,
                                rooms: vec![*rooms.get(user)?],
                            })
                        })
                        .collect())
                }
            })
            .await?;
        }
        let (loader, _task) = RoomsLoader::start(
            ctx.rpc.clone(),
            ctx.config.bus_timeout(),
            ctx.shutdown.clone(),
        );
        let ask = |user| {
            let loader = loader.clone();
            tokio::spawn(async move { loader.rooms_of(user).await })
        };

        let first = ask(users[0]);
        while asked.lock().expect("asked").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Nine users (one of them twice) ask while the first is answered.
        let mut rest: Vec<_> = users[1..].iter().map(|user| ask(*user)).collect();
        rest.push(ask(users[1]));
        while loader.asks.capacity() > WAITING - rest.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.add_permits(2);

        assert_eq!(first.await??, vec![rooms[&users[0]]]);
        let answers = futures::future::try_join_all(rest).await?;
        for (user, answer) in users[1..].iter().chain([&users[1]]).zip(answers) {
            let expected: Vec<RoomId> = rooms.get(user).into_iter().copied().collect();
            assert_eq!(answer?, expected, "rooms of {user}");
        }
        let asked = asked.lock().expect("asked").clone();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert_eq!(asked[0], vec![users[0]]);
        let second: HashSet<UserId> = asked[1].iter().copied().collect();
        assert_eq!(asked[1].len(), 9);
        assert_eq!(second, users[1..].iter().copied().collect());
        ctx.shutdown.cancel();
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn an_ask_behind_an_unanswered_request_waits_one_timeout_not_two() -> anyhow::Result<()> {
        let ctx =
            ServiceContext::connect("test", Config::default(), std::future::pending()).await?;
        // chat-service takes every request and never answers.
        respond::<RoomsOf, _, _>(&ctx, "test", |_| std::future::pending()).await?;
        let timeout = ctx.config.bus_timeout();
        let (loader, _task) = RoomsLoader::start(ctx.rpc.clone(), timeout, ctx.shutdown.clone());

        let started = tokio::time::Instant::now();
        let first = tokio::spawn({
            let loader = loader.clone();
            async move { loader.rooms_of(UserId::new()).await }
        });
        // Queued while the first request is out.
        tokio::time::sleep(timeout / 2).await;
        let second = loader.rooms_of(UserId::new()).await;
        let waited = started.elapsed();

        let unavailable = RpcCode::Unavailable;
        assert_eq!(first.await?.map_err(|e| e.code), Err(unavailable));
        assert_eq!(second.map_err(|e| e.code), Err(unavailable));
        // Asked at half the timeout, answered at one and a half, not two.
        assert_eq!(waited, timeout / 2 + timeout);
        ctx.shutdown.cancel();
        Ok(())
    }
}
