//! The wire protocol's hot paths: parsing a client's `send`, serialising a
//! `message` frame (done once per message, shared by every recipient).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use unhidra_core::{
    ids::{MessageId, RoomId, UserId},
    protocol::{ServerFrame, parse_client_frame},
};

fn protocol(c: &mut Criterion) {
    let room = RoomId::new();
    let send = format!(
        r#"{{"type":"send","id":"c-42","room":"{room}","body":"{}"}}"#,
        "x".repeat(100)
    );
    c.bench_function("parse send frame (100-byte body)", |b| {
        b.iter(|| parse_client_frame(black_box(&send)))
    });
    let frame = ServerFrame::Message {
        room,
        seq: 42,
        message_id: MessageId::new(),
        sender: UserId::new(),
        body: "x".repeat(100),
        sent_at: chrono::Utc::now(),
    };
    c.bench_function("serialise message frame (100-byte body)", |b| {
        b.iter(|| serde_json::to_string(black_box(&frame)))
    });
}

criterion_group!(benches, protocol);
criterion_main!(benches);
