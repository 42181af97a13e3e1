//! `fanout` and `ingest`: sender connections (spread over the rooms, one room
//! each) send at a fixed total rate without waiting for acks; subscriber
//! connections receive. Each body carries its send time, so every delivery is a latency
//! sample; acks are timed against their send (they arrive in send order).
//! A warm-up at the full rate comes first, sent and checked but not timed.
//! The server's CPU time (and the loadgen's own) from the first measured
//! send to the last delivery is reported per acked message and per delivery.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use unhidra_client::{Receiver, Sender};
use unhidra_core::{
    ids::RoomId,
    protocol::{ClientFrame, ServerFrame},
};

use crate::{
    local::cpu_seconds_of,
    report::{Latency, Report, histogram},
    target::Target,
};

/// The shape of a traffic run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Traffic {
    pub rooms: usize,
    pub subscribers_per_room: usize,
    pub senders: usize,
    /// Messages per second, all senders together.
    pub rate: u64,
    pub seconds: u64,
    pub body_bytes: usize,
    pub ids: ClientIds,
    /// Each sender connection a user of its own; else the senders of a
    /// room share its one sending user.
    pub user_per_sender: bool,
    /// Seconds of sending at the full rate before the measured `seconds`
    /// (not timed, not in the figures): the run starts from idle, and
    /// its first moments are not the rate's steady state.
    pub warm_up_seconds: u64,
}

/// How senders choose their sends' client ids (each is also the send's
/// idempotency key, which the server indexes per user: how the ids sort
/// decides how many of the index's pages each group commit writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIds {
    /// A prefix per sender and a counter: `<uuid>-0`, `<uuid>-1`, ...
    Sequential,
    /// A fresh random UUID (version 4) per send, as `crypto.randomUUID()`.
    Random,
    /// A fresh time-ordered UUID (version 7) per send.
    TimeOrdered,
}

impl ClientIds {
    /// The id of a sender's `sent`th send (`prefix`: the sender's own).
    fn id(self, prefix: &uuid::Uuid, sent: u64) -> String {
        match self {
            Self::Sequential => format!("{prefix}-{sent}"),
            Self::Random => uuid::Uuid::new_v4().to_string(),
            Self::TimeOrdered => uuid::Uuid::now_v7().to_string(),
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
}

/// What each phase of a run counted: the warm-up's sends are answered and
/// delivered like the others (and fail the run alike when they are not),
/// but not timed and not in the figures.
#[derive(Default)]
struct Phases {
    warm_up: Counters,
    measured: Counters,
}

impl Phases {
    fn of(&self, warm_up: bool) -> &Counters {
        if warm_up {
            &self.warm_up
        } else {
            &self.measured
        }
    }
}

/// One sender's sends: first its warm-up's, then those measured.
#[derive(Debug, Clone, Copy)]
struct Share {
    warm_up: u64,
    measured: u64,
}

impl Share {
    fn total(self) -> u64 {
        self.warm_up + self.measured
    }

    /// Whether the sender's `i`th send (from 0) is one of its warm-up's.
    fn is_warm_up(self, i: u64) -> bool {
        i < self.warm_up
    }
}

/// Sender `s`'s part of `total` sends spread over `senders`.
fn part(total: u64, s: usize, senders: usize) -> u64 {
    total / senders as u64 + u64::from((s as u64) < total % senders as u64)
}

/// How a body starts: the send's time, measured or warm-up (the
/// subscribers tell them apart by it).
const MEASURED_STAMP: &str = "t=";
const WARM_UP_STAMP: &str = "w=";

/// How often a sender wakes at most to send what is due: a sender at its
/// share of the rate wakes once per send when that is rarer (a thousand
/// senders at ten messages a second each would otherwise wake 200,000
/// times a second to send 10,000 messages).
const TICK: Duration = Duration::from_millis(5);

/// How often a sender at `per_second` wakes ([`TICK`]).
fn wake_period(per_second: f64) -> Duration {
    TICK.max(Duration::try_from_secs_f64(1.0 / per_second).unwrap_or(TICK))
}

const DRAIN: Duration = Duration::from_secs(5);

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

pub async fn run(target: &Target, scenario: &str, traffic: Traffic) -> anyhow::Result<Report> {
    anyhow::ensure!(
        traffic.rooms > 0 && traffic.senders > 0,
        "--rooms and --senders must be at least 1"
    );
    let sends = |seconds: u64| {
        traffic
            .rate
            .checked_mul(seconds)
            .context("--rate times the seconds is too many sends")
    };
    let total = sends(traffic.seconds)?;
    let warm_up = sends(traffic.warm_up_seconds)?;
    let mut setup = target.prepare(traffic.rooms).await?;
    if traffic.user_per_sender {
        target.add_senders(&mut setup, traffic.senders).await?;
    }
    let counters = Arc::new(Phases::default());
    let (stop, stopped) = watch::channel(false);

    let mut subscribers = Vec::new();
    for identity in &setup.subscribers {
        for _ in 0..traffic.subscribers_per_room {
            let (_, receiver) = target.connect(identity).await?.split();
            subscribers.push(tokio::spawn(subscribe(
                receiver,
                Arc::clone(&counters),
                stopped.clone(),
            )));
        }
    }
    // Every sender connects before the clock starts: with many senders the
    // connects (authenticated, one at a time) would count as sending time,
    // and their CPU as the messages'.
    let mut connected = Vec::with_capacity(traffic.senders);
    for s in 0..traffic.senders {
        let room = s % setup.rooms.len();
        let identity = &setup.senders[if traffic.user_per_sender { s } else { room }];
        connected.push((room, target.connect(identity).await?.split()));
    }
    let started = Instant::now();
    // The senders' wake-ups spread evenly over one period, as independent
    // clients' would be, not all at once.
    let period = wake_period(traffic.rate as f64 / traffic.senders as f64);
    let mut senders = Vec::new();
    for (s, (room, (sender, receiver))) in connected.into_iter().enumerate() {
        let share = Share {
            warm_up: part(warm_up, s, traffic.senders),
            measured: part(total, s, traffic.senders),
        };
        let (sent_at_tx, sent_at_rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push((
            tokio::spawn(send(
                sender,
                setup.rooms[room],
                share,
                traffic.clone(),
                started + period.mul_f64(s as f64 / traffic.senders as f64),
                sent_at_tx,
                Arc::clone(&counters),
            )),
            tokio::spawn(acks(receiver, share, sent_at_rx, Arc::clone(&counters))),
        ));
    }
    let progress = tokio::spawn(progress(
        Arc::clone(&counters),
        total,
        traffic.subscribers_per_room as u64,
    ));
    tokio::time::sleep_until((started + Duration::from_secs(traffic.warm_up_seconds)).into()).await;
    let cpu_before = (target.cpu_seconds().await?, cpu_seconds_of("self")?);
    let send_path_before = target.send_path().await;
    let measured_from = Instant::now();

    let mut ack_latency = histogram()?;
    let mut send_errors = Vec::new();
    for (sending, acking) in senders {
        if let Err(e) = sending.await? {
            send_errors.push(e.to_string());
        }
        ack_latency.add(acking.await??)?;
    }
    let sending_done = measured_from.elapsed();
    let fanout = traffic.subscribers_per_room as u64;
    let undelivered = |c: &Counters| {
        c.delivered.load(Ordering::Relaxed) < c.acked.load(Ordering::Relaxed) * fanout
    };
    let drain_until = Instant::now() + DRAIN;
    while (undelivered(&counters.measured) || undelivered(&counters.warm_up))
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    let mut delivery_latency = histogram()?;
    let mut subscriber_errors = Vec::new();
    for subscriber in subscribers {
        match subscriber.await? {
            Ok(latency) => delivery_latency.add(latency)?,
            Err(e) => subscriber_errors.push(e.to_string()),
        }
    }
    progress.abort();
    eprintln!();
    let server_cpu = target.cpu_seconds().await? - cpu_before.0;
    let loadgen_cpu = cpu_seconds_of("self")? - cpu_before.1;
    let send_path = match (send_path_before, target.send_path().await) {
        (Some(before), Some(after)) => {
            after.figures_since(&before, measured_from.elapsed().as_secs_f64())
        }
        _ => Vec::new(),
    };

    let mut failures = send_errors;
    if let Some(first) = subscriber_errors.first() {
        failures.push(format!(
            "{} subscriber connections failed, first: {first}",
            subscriber_errors.len()
        ));
    }
    failures.extend(missing(&counters.warm_up, fanout, "warm-up "));
    failures.extend(missing(&counters.measured, fanout, ""));
    let measured = &counters.measured;
    let sent = measured.sent.load(Ordering::Relaxed);
    let acked = measured.acked.load(Ordering::Relaxed);
    let delivered = measured.delivered.load(Ordering::Relaxed);
    let expected = acked * fanout;
    let seconds = sending_done.as_secs_f64();
    let mut report = Report {
        scenario: scenario.to_owned(),
        target: target.name().to_owned(),
        parameters: serde_json::to_value(&traffic)?,
        figures: vec![
            ("messages sent".into(), sent as f64),
            ("messages acked".into(), acked as f64),
            ("acked per second".into(), acked as f64 / seconds),
            ("deliveries expected".into(), expected as f64),
            ("deliveries".into(), delivered as f64),
            ("deliveries per second".into(), delivered as f64 / seconds),
            (
                "delivered fraction".into(),
                if expected == 0 {
                    1.0
                } else {
                    delivered as f64 / expected as f64
                },
            ),
            ("sending time (s)".into(), seconds),
            (
                "server CPU per acked message (µs)".into(),
                per_million(server_cpu, acked),
            ),
            (
                "server CPU per delivery (µs)".into(),
                per_million(server_cpu, delivered),
            ),
            (
                "loadgen CPU per acked message (µs)".into(),
                per_million(loadgen_cpu, acked),
            ),
        ],
        latencies: vec![
            ("ack".into(), Latency::of(&ack_latency)),
            ("delivery".into(), Latency::of(&delivery_latency)),
        ],
        failures,
    };
    // Where an ack's time went in the server, after the figures every
    // target reports.
    report.figures.extend(send_path);
    Ok(report)
}

/// What went missing in a phase, `phase` naming it ("warm-up " or "").
fn missing(counters: &Counters, fanout: u64, phase: &str) -> Vec<String> {
    let sent = counters.sent.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    let refused = counters.refused.load(Ordering::Relaxed);
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let expected = acked * fanout;
    let mut failures = Vec::new();
    if acked + refused < sent {
        failures.push(format!(
            "{} of {sent} {phase}sends never answered",
            sent - acked - refused
        ));
    }
    if refused > 0 {
        failures.push(format!("{refused} of {sent} {phase}sends refused"));
    }
    if delivered < expected {
        failures.push(format!(
            "{} of {expected} {phase}deliveries missing after {DRAIN:?}",
            expected - delivered
        ));
    }
    failures
}

/// `seconds` per item in microseconds (0 without items).
fn per_million(seconds: f64, items: u64) -> f64 {
    if items == 0 {
        0.0
    } else {
        seconds * 1e6 / items as f64
    }
}

/// Sends its `share` of messages to `room` at this connection's share of
/// the rate, from `start` on.
async fn send(
    mut sender: Sender,
    room: RoomId,
    share: Share,
    traffic: Traffic,
    start: Instant,
    sent_at: tokio::sync::mpsc::UnboundedSender<Instant>,
    counters: Arc<Phases>,
) -> anyhow::Result<()> {
    let count = share.total();
    let per_second = traffic.rate as f64 / traffic.senders as f64;
    let mut ticker = tokio::time::interval_at(start.into(), wake_period(per_second));
    let mut sent = 0;
    // Client ids are remembered per user for a while (a repeat gets the
    // first ack): unique across runs.
    let prefix = uuid::Uuid::now_v7();
    while sent < count {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() * per_second) as u64 + 1).min(count);
        while sent < due {
            let warm_up = share.is_warm_up(sent);
            let stamp = if warm_up {
                WARM_UP_STAMP
            } else {
                MEASURED_STAMP
            };
            let stamp = format!("{stamp}{};", unix_nanos());
            let padding = traffic.body_bytes.saturating_sub(stamp.len());
            let frame = ClientFrame::Send {
                id: traffic.ids.id(&prefix, sent),
                room,
                body: format!("{stamp}{}", "x".repeat(padding)),
            };
            sender.feed(&frame).await?;
            let _ = sent_at.send(Instant::now());
            sent += 1;
            counters.of(warm_up).sent.fetch_add(1, Ordering::Relaxed);
        }
        sender.flush().await?;
    }
    Ok(())
}

/// Times the acks of one sender connection (they come in send order), but
/// not its warm-up's.
async fn acks(
    mut receiver: Receiver,
    share: Share,
    mut sent_at: tokio::sync::mpsc::UnboundedReceiver<Instant>,
    counters: Arc<Phases>,
) -> anyhow::Result<Histogram<u64>> {
    let count = share.total();
    let mut latency = histogram()?;
    let mut pending: VecDeque<Instant> = VecDeque::new();
    let mut answered = 0;
    while answered < count {
        let next = tokio::time::timeout(DRAIN * 2, receiver.next()).await;
        let frame = match next {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => anyhow::bail!("sender connection closed after {answered} answers"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => anyhow::bail!("no answer for {:?} after {answered} answers", DRAIN * 2),
        };
        let (ack, error) = match frame {
            ServerFrame::Ack { .. } => (true, false),
            ServerFrame::Error { .. } => (false, true),
            _ => continue,
        };
        while let Ok(at) = sent_at.try_recv() {
            pending.push_back(at);
        }
        let warm_up = share.is_warm_up(answered);
        if let Some(at) = pending.pop_front().filter(|_| !warm_up) {
            latency.record(at.elapsed().as_micros().max(1) as u64)?;
        }
        answered += 1;
        let counters = counters.of(warm_up);
        if ack {
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
        if error {
            counters.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(latency)
}

/// Counts deliveries, and times those measured, until told to stop.
async fn subscribe(
    mut receiver: Receiver,
    counters: Arc<Phases>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram()?;
    loop {
        let frame = tokio::select! {
            _ = stop.changed() => return Ok(latency),
            frame = receiver.next() => frame?,
        };
        match frame {
            Some(ServerFrame::Message { body, .. }) => {
                let warm_up = body.starts_with(WARM_UP_STAMP);
                counters
                    .of(warm_up)
                    .delivered
                    .fetch_add(1, Ordering::Relaxed);
                let sent = body
                    .strip_prefix(MEASURED_STAMP)
                    .and_then(|rest| rest.split(';').next())
                    .and_then(|nanos| nanos.parse::<u64>().ok());
                if let Some(sent) = sent {
                    let micros = unix_nanos().saturating_sub(sent) / 1000;
                    latency.record(micros.max(1))?;
                }
            }
            Some(_) => {}
            None => anyhow::bail!("subscriber connection closed by the server"),
        }
    }
}

/// A progress bar on stderr, once a second.
async fn progress(counters: Arc<Phases>, total: u64, fanout: u64) {
    let counters = &counters.measured;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let sent = counters.sent.load(Ordering::Relaxed);
        let done = if total == 0 {
            1.0
        } else {
            sent as f64 / total as f64
        };
        let filled = (done * 30.0) as usize;
        eprint!(
            "\r[{}{}] {:>3.0}% sent {sent}/{total} acked {} delivered {}/{}   ",
            "#".repeat(filled),
            ".".repeat(30 - filled.min(30)),
            done * 100.0,
            counters.acked.load(Ordering::Relaxed),
            counters.delivered.load(Ordering::Relaxed),
            counters.acked.load(Ordering::Relaxed) * fanout,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_client_id_sorts_as_named() -> anyhow::Result<()> {
        let prefix = uuid::Uuid::now_v7();
        let ids = |kind: ClientIds| (0..50).map(|n| kind.id(&prefix, n)).collect::<Vec<_>>();

        let sequential = ids(ClientIds::Sequential);
        assert_eq!(sequential[0], format!("{prefix}-0"));
        assert_eq!(sequential[49], format!("{prefix}-49"));

        let random = ids(ClientIds::Random);
        for id in &random {
            assert_eq!(uuid::Uuid::parse_str(id)?.get_version_num(), 4);
        }
        let mut sorted = random.clone();
        sorted.sort();
        assert_ne!(sorted, random, "50 random ids came out in order");

        let time_ordered = ids(ClientIds::TimeOrdered);
        for id in &time_ordered {
            assert_eq!(uuid::Uuid::parse_str(id)?.get_version_num(), 7);
        }
        let mut sorted = time_ordered.clone();
        sorted.sort();
        assert_eq!(sorted, time_ordered);
        Ok(())
    }
}
