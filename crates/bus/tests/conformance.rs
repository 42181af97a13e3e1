//! One behaviour, two buses: every test runs against the in-process bus and
//! against NATS JetStream (skipped outside CI when no NATS answers).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use unhidra_bus::{Bus, BusError, Deliveries, Delivery, Headers, MemoryBus, NatsBus, Outgoing};
use unhidra_core::streams::{ConsumerSpec, StreamSpec};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(5);

/// The buses under test, each with a prefix of its own.
async fn buses() -> Vec<(Arc<dyn Bus>, String)> {
    let mut buses: Vec<(Arc<dyn Bus>, String)> =
        vec![(Arc::new(MemoryBus::new()), unhidra_testkit::unique_prefix())];
    if let Some(url) = unhidra_testkit::nats_url().await {
        match NatsBus::connect(&url, "_INBOX").await {
            Ok(bus) => buses.push((Arc::new(bus), unhidra_testkit::unique_prefix())),
            Err(e) => panic!("NATS at {url} answers TCP but not the protocol: {e}"),
        }
    }
    buses
}

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The test stream, keeping messages for the consumers the tests use.
fn stream_spec(prefix: &str) -> StreamSpec {
    StreamSpec {
        name: format!("{prefix}_EVENTS"),
        subjects: vec![format!("{prefix}.events.>")],
        max_age: Duration::from_secs(600),
        max_bytes: 1024 * 1024,
        duplicate_window: Duration::from_secs(60),
        consumers: ["store", "audit", "batch"]
            .into_iter()
            .map(|durable| consumer_spec(prefix, durable))
            .collect(),
    }
}

fn consumer_spec(prefix: &str, durable: &str) -> ConsumerSpec {
    ConsumerSpec {
        stream: format!("{prefix}_EVENTS"),
        durable: durable.to_owned(),
        filter: None,
        ack_wait: Duration::from_secs(1),
        max_deliver: None,
    }
}

/// The consumer's pending count once it has come to `expected`, or as it is
/// after [`WAIT`]: the server records an acknowledgement soon after `ack`
/// returns, not necessarily before.
async fn pending_after_acks(
    bus: &dyn Bus,
    consumer: &ConsumerSpec,
    expected: u64,
) -> Result<u64, BusError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pending = bus.consumer_pending(consumer).await?;
        if pending == expected || tokio::time::Instant::now() >= deadline {
            return Ok(pending);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next delivery of a durable consumer, within [`WAIT`].
async fn next_delivery(
    deliveries: &mut Deliveries,
) -> Result<Delivery, Box<dyn std::error::Error>> {
    Ok(tokio::time::timeout(WAIT, deliveries.next())
        .await?
        .ok_or("closed")??)
}

/// Creates the test stream and publishes `1` and `2` into it (ids `m1`, `m2`).
async fn stream_with_one_and_two(bus: &dyn Bus, prefix: &str) -> TestResult {
    bus.ensure_stream(&stream_spec(prefix)).await?;
    for (id, body) in [("m1", "1"), ("m2", "2")] {
        bus.publish_durable(
            &format!("{prefix}.events.x"),
            id,
            Headers::new(),
            text(body),
        )
        .await?;
    }
    Ok(())
}

/// Whether no delivery comes for 1.5 s, past the test consumers' ack wait.
async fn stays_quiet(deliveries: &mut Deliveries) -> bool {
    tokio::time::timeout(Duration::from_millis(1500), deliveries.next())
        .await
        .is_err()
}

#[tokio::test]
async fn subscribers_see_matching_subjects_with_headers() -> TestResult {
    for (bus, p) in buses().await {
        let mut one = bus.subscribe(&format!("{p}.room.*.messages")).await?;
        let mut all = bus.subscribe(&format!("{p}.>")).await?;
        let mut headers = Headers::new();
        headers.insert("x-request-id".into(), "r-1".into());
        bus.publish(&format!("{p}.room.r1.messages"), headers, text("a"))
            .await?;
        bus.publish(&format!("{p}.other.thing"), Headers::new(), text("b"))
            .await?;

        let got = tokio::time::timeout(WAIT, one.next())
            .await?
            .ok_or("closed")?;
        assert_eq!(got.subject, format!("{p}.room.r1.messages"));
        assert_eq!(got.payload, text("a"));
        assert_eq!(
            got.headers.get("x-request-id").map(String::as_str),
            Some("r-1")
        );
        let first = tokio::time::timeout(WAIT, all.next())
            .await?
            .ok_or("closed")?;
        let second = tokio::time::timeout(WAIT, all.next())
            .await?
            .ok_or("closed")?;
        assert_eq!((first.payload, second.payload), (text("a"), text("b")));
        // `*` matches one token only: nothing else arrives on `one`.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), one.next())
                .await
                .is_err()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_queue_group_gets_each_message_once() -> TestResult {
    for (bus, p) in buses().await {
        let subject = format!("{p}.work");
        let a = bus.subscribe_queue(&subject, "workers").await?;
        let b = bus.subscribe_queue(&subject, "workers").await?;
        for i in 0..20 {
            bus.publish(&subject, Headers::new(), text(&i.to_string()))
                .await?;
        }
        let mut merged = futures::stream::select(a, b);
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let m = tokio::time::timeout(WAIT, merged.next())
                .await?
                .ok_or("closed")?;
            assert!(
                seen.insert(m.payload),
                "a message reached two group members"
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), merged.next())
                .await
                .is_err()
        );
    }
    Ok(())
}

#[tokio::test]
async fn request_reply_and_no_responders() -> TestResult {
    for (bus, p) in buses().await {
        let subject = format!("{p}.rpc.echo");
        let mut requests = bus.subscribe_queue(&subject, "echo").await?;
        let responder = Arc::clone(&bus);
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                if let Some(reply) = request.reply {
                    let mut answer = request.payload.to_vec();
                    answer.extend_from_slice(b"!");
                    let _ = responder
                        .publish(&reply, Headers::new(), answer.into())
                        .await;
                }
            }
        });
        let reply = bus
            .request(&subject, Headers::new(), text("hi"), WAIT)
            .await?;
        assert_eq!(reply.payload, text("hi!"));

        let nobody = bus
            .request(&format!("{p}.rpc.nobody"), Headers::new(), text("x"), WAIT)
            .await;
        assert!(
            matches!(nobody, Err(BusError::NoResponders(_))),
            "{nobody:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn durable_consumers_resume_redeliver_and_deduplicate() -> TestResult {
    for (bus, p) in buses().await {
        let spec = stream_spec(&p);
        bus.ensure_stream(&spec).await?;
        // Idempotent, and updates an existing stream.
        bus.ensure_stream(&StreamSpec {
            max_age: Duration::from_secs(900),
            ..spec.clone()
        })
        .await?;
        for (id, body) in [
            ("m1", "1"),
            ("m2", "2"),
            ("m2", "2 again"),
            ("m3", "3"),
            ("m4", "4"),
        ] {
            bus.publish_durable(&format!("{p}.events.x"), id, Headers::new(), text(body))
                .await?;
        }

        let consumer = consumer_spec(&p, "store");
        let mut deliveries = bus.consume(&consumer).await?;
        assert_eq!(bus.consumer_pending(&consumer).await?, 4);
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let d = next_delivery(&mut deliveries).await?;
            assert_eq!(d.attempt, 1);
            bodies.push(d.message.payload.clone());
            if bodies.len() <= 2 {
                d.ack().await?;
            }
        }
        assert_eq!(bodies, vec![text("1"), text("2"), text("3"), text("4")]);
        assert_eq!(pending_after_acks(&*bus, &consumer, 2).await?, 2);
        // The consumer goes away with 3 and 4 unacknowledged...
        drop(deliveries);

        // ...and after it resumes, exactly those come back.
        let mut deliveries = bus.consume(&consumer).await?;
        let mut again = Vec::new();
        for _ in 0..2 {
            let d = next_delivery(&mut deliveries).await?;
            assert!(d.attempt >= 2);
            again.push(d.message.payload.clone());
            if d.message.payload == text("3") {
                d.ack().await?;
            } else {
                d.nak(Duration::from_millis(100)).await?;
            }
        }
        again.sort();
        assert_eq!(again, vec![text("3"), text("4")]);
        let d = next_delivery(&mut deliveries).await?;
        assert_eq!(d.message.payload, text("4"));
        d.ack().await?;
        assert!(
            stays_quiet(&mut deliveries).await,
            "an acknowledged message came back"
        );
        assert_eq!(pending_after_acks(&*bus, &consumer, 0).await?, 0);

        // The stream's other consumer has acknowledged nothing yet: it starts
        // from the beginning, and nothing was removed from under it.
        let mut other = bus.consume(&consumer_spec(&p, "audit")).await?;
        let d = next_delivery(&mut other).await?;
        assert_eq!(d.message.payload, text("1"));
    }
    Ok(())
}

#[tokio::test]
async fn a_delivery_left_unacknowledged_comes_back_after_the_ack_wait() -> TestResult {
    for (bus, p) in buses().await {
        stream_with_one_and_two(bus.as_ref(), &p).await?;
        let consumer = consumer_spec(&p, "store");
        let mut deliveries = bus.consume(&consumer).await?;
        let first = next_delivery(&mut deliveries).await?;
        assert_eq!(first.message.payload, text("1"));
        // 1 is held unacknowledged while 2 and 3 flow past it.
        let second = next_delivery(&mut deliveries).await?;
        assert_eq!(second.message.payload, text("2"));
        second.ack().await?;
        bus.publish_durable(&format!("{p}.events.x"), "m3", Headers::new(), text("3"))
            .await?;
        let third = next_delivery(&mut deliveries).await?;
        assert_eq!(
            (third.message.payload.clone(), third.attempt),
            (text("3"), 1)
        );
        third.ack().await?;
        // The ack wait is a second: 1 comes back then, and only 1.
        let again = next_delivery(&mut deliveries).await?;
        assert_eq!(
            (again.message.payload.clone(), again.attempt),
            (text("1"), 2)
        );
        again.ack().await?;
        assert!(
            stays_quiet(&mut deliveries).await,
            "an acknowledged message came back"
        );
        drop(first);
    }
    Ok(())
}

#[tokio::test]
async fn closed_streams_end_a_consumer_only_once_it_handled_what_they_held() -> TestResult {
    for (bus, p) in buses().await {
        stream_with_one_and_two(bus.as_ref(), &p).await?;
        let mut deliveries = bus.consume(&consumer_spec(&p, "store")).await?;
        let first = next_delivery(&mut deliveries).await?;
        assert_eq!(first.message.payload, text("1"));
        bus.close_streams().await;
        let late = bus
            .publish_durable(&format!("{p}.events.x"), "m3", Headers::new(), text("3"))
            .await;
        let second = next_delivery(&mut deliveries).await?;
        assert_eq!(second.message.payload, text("2"));
        second.ack().await?;
        if bus.streams_outlive_process() {
            // JetStream's streams stay open: what comes later is kept.
            assert!(late.is_ok(), "{late:?}");
            let third = next_delivery(&mut deliveries).await?;
            assert_eq!(third.message.payload, text("3"));
            third.ack().await?;
            first.ack().await?;
            continue;
        }
        assert!(matches!(late, Err(BusError::Closed)), "{late:?}");
        // 1 was given but not acknowledged: it comes back after the ack
        // wait, closed or not.
        let again = next_delivery(&mut deliveries).await?;
        assert_eq!(
            (again.message.payload.clone(), again.attempt),
            (text("1"), 2)
        );
        again.ack().await?;
        drop(first);
        let end = tokio::time::timeout(WAIT, deliveries.next()).await?;
        assert!(end.is_none(), "deliveries went on: {end:?}");
    }
    Ok(())
}

#[tokio::test]
async fn consumed_returns_once_every_consumer_acknowledged_what_the_stream_took() -> TestResult {
    for (bus, p) in buses().await {
        stream_with_one_and_two(bus.as_ref(), &p).await?;
        let stream = stream_spec(&p).name;
        let waiting = {
            let (bus, stream) = (Arc::clone(&bus), stream.clone());
            tokio::spawn(async move { bus.consumed(&stream).await })
        };
        // Every consumer but the last acknowledges both messages.
        for durable in ["store", "audit"] {
            let mut deliveries = bus.consume(&consumer_spec(&p, durable)).await?;
            for _ in 0..2 {
                next_delivery(&mut deliveries).await?.ack().await?;
            }
        }
        if !bus.streams_outlive_process() {
            // The in-process stream is all there is of the two messages
            // until the last consumer has them.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                !waiting.is_finished(),
                "consumed before the last consumer acknowledged"
            );
        }
        let mut deliveries = bus.consume(&consumer_spec(&p, "batch")).await?;
        let first = next_delivery(&mut deliveries).await?;
        let second = next_delivery(&mut deliveries).await?;
        second.ack().await?;
        if !bus.streams_outlive_process() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                !waiting.is_finished(),
                "consumed with the first message unacknowledged"
            );
        }
        first.ack().await?;
        tokio::time::timeout(WAIT, waiting).await???;
        // With nothing unacknowledged a call returns at once.
        tokio::time::timeout(WAIT, bus.consumed(&stream)).await??;
    }
    Ok(())
}

#[tokio::test]
async fn durable_publish_needs_a_stream() -> TestResult {
    for (bus, p) in buses().await {
        let result = bus
            .publish_durable(&format!("{p}.nowhere"), "id", Headers::new(), text("x"))
            .await;
        assert!(result.is_err(), "{result:?}");
        let consume = bus.consume(&consumer_spec(&p, "ghost")).await;
        assert!(matches!(consume, Err(BusError::UnknownStream(_))));
    }
    Ok(())
}

#[tokio::test]
async fn batch_publishes_are_stored_in_order_and_deduplicated() -> TestResult {
    for (bus, p) in buses().await {
        bus.ensure_stream(&stream_spec(&p)).await?;
        let mut live = bus.subscribe(&format!("{p}.events.>")).await?;
        let outgoing = |id: &str, body: &str| Outgoing {
            subject: format!("{p}.events.{id}"),
            msg_id: id.to_owned(),
            headers: Headers::new(),
            payload: text(body),
        };
        let batch: Vec<Outgoing> = (0..200)
            .map(|i| outgoing(&format!("b{i}"), &i.to_string()))
            .collect();
        bus.publish_durable_batch(batch.clone()).await?;
        // Published again (a relay after a lost acknowledgement): stored once.
        bus.publish_durable_batch(batch[..50].to_vec()).await?;

        let consumer = consumer_spec(&p, "batch");
        let mut deliveries = bus.consume(&consumer).await?;
        for i in 0..200 {
            let d = next_delivery(&mut deliveries).await?;
            assert_eq!(d.message.payload, text(&i.to_string()));
            d.ack().await?;
        }
        assert_eq!(pending_after_acks(&*bus, &consumer, 0).await?, 0);
        let first = tokio::time::timeout(WAIT, live.next())
            .await?
            .ok_or("closed")?;
        assert_eq!(first.payload, text("0"));

        let nowhere = bus
            .publish_durable_batch(vec![Outgoing {
                subject: format!("{p}.nowhere"),
                ..outgoing("x", "x")
            }])
            .await;
        assert!(matches!(nowhere, Err(BusError::NoStream(_))), "{nowhere:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_full_stream_refuses_publishes_and_keeps_what_is_unprocessed() -> TestResult {
    for (bus, p) in buses().await {
        let spec = StreamSpec {
            max_bytes: 4096,
            consumers: vec![consumer_spec(&p, "store")],
            ..stream_spec(&p)
        };
        bus.ensure_stream(&spec).await?;
        let body = "x".repeat(200);
        let mut stored = 0;
        let refused = loop {
            let published = bus
                .publish_durable(
                    &format!("{p}.events.x"),
                    &format!("m{stored}"),
                    Headers::new(),
                    text(&body),
                )
                .await;
            match published {
                Ok(()) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 100, "4 KiB never filled up");
        };
        assert!(stored >= 5, "only {stored} fit: {refused}");

        // Every stored message is still there, none dropped for the refused.
        let consumer = consumer_spec(&p, "store");
        let mut deliveries = bus.consume(&consumer).await?;
        for n in 0..stored {
            let d = next_delivery(&mut deliveries).await?;
            assert_eq!(d.message.payload, text(&body), "message {n}");
            d.ack().await?;
        }
        // Processed messages leave the stream: there is room again.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let again = bus
                .publish_durable(
                    &format!("{p}.events.x"),
                    "after",
                    Headers::new(),
                    text(&body),
                )
                .await;
            if again.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still full after acks: {again:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let d = next_delivery(&mut deliveries).await?;
        assert_eq!(d.message.payload, text(&body));
    }
    Ok(())
}
