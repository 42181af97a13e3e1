//! Registry delivery: one message frame handed to every member connection
//! of a room (the frame is shared, each connection's queue gets a handle),
//! and each queue then emptied as its connection's task would.

use std::hint::black_box;

use axum::extract::ws::Utf8Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_service::bench::{Outbound, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use unhidra_core::ids::{RoomId, SessionId, UserId};

fn delivery(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry delivery");
    for members in [10, 100, 1000] {
        let registry = Registry::default();
        let room = RoomId::new();
        let mut queues = Vec::with_capacity(members);
        for _ in 0..members {
            let (outbound, queue) = mpsc::channel(256);
            let id = registry.register(
                UserId::new(),
                SessionId::new(),
                outbound,
                CancellationToken::new(),
                false,
            );
            registry.add_rooms(id, &[room]);
            queues.push(queue);
        }
        let frame = Utf8Bytes::from(format!(
            r#"{{"type":"message","room":"{room}","seq":1,"body":"{}"}}"#,
            "x".repeat(100)
        ));
        let mut seq = 0;
        group.bench_with_input(
            BenchmarkId::new("one frame to a room's connections", members),
            &members,
            |b, _| {
                b.iter(|| {
                    seq += 1;
                    let fanout = registry.deliver(room, seq, black_box(&frame));
                    for queue in &mut queues {
                        while let Ok(Outbound::Frame(frame)) = queue.try_recv() {
                            black_box(frame);
                        }
                    }
                    fanout
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, delivery);
criterion_main!(benches);
