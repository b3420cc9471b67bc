//! What a `/ws` session writes to its socket: the response body of the WebSocket, which the
//! HTTP connection polls whenever it can write.
//!
//! Two queues feed it. The session actor's frames (hello, answers, errors, alarms, `lagged`,
//! pings and the closing frame) come through a small channel of its own ([`Outbound`]).
//! Telemetry frames do not pass through the actor: device actors queue them in the session's
//! bounded backlog ([`TelemetryFrames`]) and the body takes them from there directly. Each time
//! the connection asks for more, the body encodes every frame waiting in both queues (the
//! actor's first, so an answer precedes the telemetry it enables and nothing follows a closing
//! frame) into one buffer, which the connection writes at once: one write for all pending
//! frames, however many arrived since the last, each still a WebSocket message of its own.
//!
//! While telemetry keeps coming, the body gathers it: after a write that carried telemetry it
//! takes the next frames only once [`GATHER`] has passed, by a timer of its own thread, and
//! takes them without asking the backlog to wake it again. A busy stream then costs the
//! device actors at most one wake-up of the session's thread per interval, and the connection
//! one write per interval, instead of one of each per frame (at 50,000 frames a second, about
//! 1,000 instead of up to 50,000); the first frame after a quiet spell still goes out at once.
//! The actor's frames are never held back.
//!
//! While the client reads slowly the connection stops asking, the backlogs fill and what does
//! not fit is skipped and reported as `lagged` before the next telemetry frame, as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::ws::{Message, OpCode, Parser};
use actix_web::web::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc;

use super::hub::{LiveMessage, SessionStats, TelemetryFrames};

/// Frames of the session actor that may wait for the socket before the actor itself waits.
const OUTBOUND_CAPACITY: usize = 32;
/// Bytes encoded in one go before the connection gets them (it asks again at once if it can
/// write more): bounds the buffer when a large backlog is waiting.
const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// After a write with telemetry, how long the body lets the next frames gather (see the module
/// documentation). Tokio's timer rounds it up to its next millisecond tick.
pub const GATHER: Duration = Duration::from_millis(1);

/// Where the session actor queues its frames for the socket.
pub type Outbound = mpsc::Sender<Message>;

/// The body of a session's WebSocket response (see the module documentation).
pub struct LiveBody {
    outbound: mpsc::Receiver<Message>,
    telemetry: TelemetryFrames,
    stats: Arc<SessionStats>,
    buf: BytesMut,
    /// The closing frame was written, or the actor is gone: nothing more is sent.
    closing: bool,
    /// Set after a write with telemetry: until it fires, telemetry gathers in the backlog.
    gather: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl LiveBody {
    /// A body reading `telemetry`, and the sender the session actor writes its frames to.
    pub fn new(telemetry: TelemetryFrames, stats: Arc<SessionStats>) -> (Outbound, LiveBody) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        (
            tx,
            LiveBody {
                outbound: rx,
                telemetry,
                stats,
                buf: BytesMut::new(),
                closing: false,
                gather: None,
            },
        )
    }

    fn text(&mut self, text: &[u8]) {
        Parser::write_message(&mut self.buf, text, OpCode::Text, true, false);
        self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Encodes one frame of the actor; `false` once the socket is to be closed.
    fn encode(&mut self, message: Message) -> bool {
        match message {
            Message::Text(text) => self.text(text.as_bytes()),
            Message::Binary(bytes) => {
                Parser::write_message(&mut self.buf, bytes, OpCode::Binary, true, false)
            }
            Message::Ping(bytes) => Parser::write_message(&mut self.buf, bytes, OpCode::Ping, true, false),
            Message::Pong(bytes) => Parser::write_message(&mut self.buf, bytes, OpCode::Pong, true, false),
            Message::Close(reason) => {
                Parser::write_close(&mut self.buf, reason, false);
                return false;
            }
            Message::Continuation(_) | Message::Nop => {}
        }
        true
    }

    /// Every frame of the actor waiting now.
    fn drain_outbound(&mut self, cx: &mut Context<'_>) {
        while !self.closing {
            match self.outbound.poll_recv(cx) {
                Poll::Ready(Some(message)) => self.closing = !self.encode(message),
                Poll::Ready(None) => self.closing = true,
                Poll::Pending => break,
            }
        }
    }

    /// Every telemetry frame waiting now (up to [`MAX_CHUNK_BYTES`]), each after the `lagged`
    /// report of the frames skipped before it; how many. With `wait`, the backlog wakes the
    /// body when it finds it empty; without, nothing is left to wake it.
    fn drain_telemetry(&mut self, cx: &mut Context<'_>, wait: bool) -> usize {
        let mut taken = 0;
        while self.buf.len() < MAX_CHUNK_BYTES {
            // Taken without a waker while there are any (and without using up the task's
            // cooperative budget); only an empty backlog is asked to wake the body.
            let frame = match self.telemetry.try_frame() {
                Some(frame) => frame,
                None if wait => match self.telemetry.poll_frame(cx) {
                    Poll::Ready(Some(frame)) => frame,
                    _ => break,
                },
                None => break,
            };
            taken += 1;
            let missed = self.telemetry.take_missed();
            if missed > 0 {
                self.stats.frames_skipped.fetch_add(missed, Ordering::Relaxed);
                let lagged = LiveMessage::Lagged {
                    stream: "telemetry",
                    missed,
                };
                if let Ok(json) = serde_json::to_vec(&lagged) {
                    self.text(&json);
                }
            }
            self.text(frame.as_bytes());
        }
        taken
    }

    /// Telemetry to write now: none while the frames gather; once the interval is over, what
    /// gathered (and the interval starts again), or, when nothing did, the body waits on the
    /// backlog again and the next frame is written as soon as it comes.
    fn take_telemetry(&mut self, cx: &mut Context<'_>) {
        if let Some(gather) = &mut self.gather {
            if gather.as_mut().poll(cx).is_pending() {
                return;
            }
            if self.drain_telemetry(cx, false) > 0 {
                self.gather_again(cx);
                return;
            }
            self.gather = None;
        }
        if self.drain_telemetry(cx, true) > 0 {
            self.gather_again(cx);
        }
    }

    /// Starts the interval over (unless a full chunk leaves more waiting: that is written as
    /// soon as the connection can take it).
    fn gather_again(&mut self, cx: &mut Context<'_>) {
        if self.buf.len() >= MAX_CHUNK_BYTES {
            return;
        }
        let deadline = tokio::time::Instant::now() + GATHER;
        let gather = self
            .gather
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        gather.as_mut().reset(deadline);
        // Registers the timer's wake-up (it cannot have fired yet).
        let _ = gather.as_mut().poll(cx);
    }
}

impl Stream for LiveBody {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.closing {
            this.drain_outbound(cx);
        }
        if !this.closing {
            this.take_telemetry(cx);
            if this.buf.len() >= MAX_CHUNK_BYTES {
                // More may be waiting: be asked again once this is written.
                cx.waker().wake_by_ref();
            }
        }
        if !this.buf.is_empty() {
            return Poll::Ready(Some(Ok(this.buf.split().freeze())));
        }
        if this.closing {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
    use drover_actors::{DeviceId, TenantId};
    use futures_util::{FutureExt, StreamExt};

    use super::*;
    use crate::dashboard::DashboardHub;
    use drover_actors::pipeline::LiveTelemetry;

    /// The text frames in `bytes`, in order (the body writes whole frames only).
    fn text_frames(mut bytes: BytesMut) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Some((fin, op, payload)) = Parser::parse(&mut bytes, false, usize::MAX).expect("a frame") {
            assert!(fin);
            match op {
                OpCode::Text => out.push(serde_json::from_slice(&payload.expect("a payload")).expect("JSON")),
                OpCode::Close => out.push(serde_json::json!({"close": true})),
                _ => {}
            }
        }
        assert!(bytes.is_empty(), "a partial frame");
        out
    }

    /// What the body gives without waiting, all chunks together.
    fn written(body: &mut LiveBody) -> (Vec<serde_json::Value>, usize, bool) {
        let mut bytes = BytesMut::new();
        let mut chunks = 0;
        loop {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    bytes.extend_from_slice(&chunk);
                    chunks += 1;
                }
                Some(None) => return (text_frames(bytes), chunks, true),
                None => return (text_frames(bytes), chunks, false),
            }
        }
    }

    /// A session of tenant `acme` watching all its devices, and the device `pump-1`.
    fn watching_all(
        hub: &DashboardHub,
    ) -> (
        TenantId,
        DeviceId,
        crate::dashboard::hub::TelemetryWatch,
        Arc<SessionStats>,
        Outbound,
        LiveBody,
    ) {
        let tenant = TenantId::parse("acme").unwrap();
        let device = DeviceId::parse("pump-1").unwrap();
        let (mut watch, frames) = hub.telemetry_watch(&tenant);
        watch.watch_all();
        let stats = hub.session_stats(&watch, "key:test".into());
        let (outbound, body) = LiveBody::new(frames, stats.clone());
        (tenant, device, watch, stats, outbound, body)
    }

    fn point(tenant: &TenantId, device: &DeviceId, seq: i64, text: Option<usize>) -> Vec<TelemetryPoint> {
        vec![TelemetryPoint {
            tenant: tenant.clone(),
            device: device.clone(),
            device_type: "pump".into(),
            metric: MetricName::parse(if text.is_some() { "log" } else { "seq" }).unwrap(),
            ts_ms: seq,
            value: match text {
                Some(len) => MetricValue::Text("x".repeat(len)),
                None => MetricValue::Number(seq as f64),
            },
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn pending_frames_are_written_together_in_order_and_none_is_lost() {
        let hub = DashboardHub::default();
        let tenant = TenantId::parse("acme").unwrap();
        let devices = [
            DeviceId::parse("pump-1").unwrap(),
            DeviceId::parse("pump-2").unwrap(),
        ];
        let (mut watch, frames) = hub.telemetry_watch(&tenant);
        watch.watch_all();
        let stats = hub.session_stats(&watch, "key:test".into());
        let (outbound, mut body) = LiveBody::new(frames, stats.clone());

        outbound
            .try_send(Message::Text(r#"{"type":"hello"}"#.into()))
            .unwrap();
        for seq in 0..500 {
            let device = &devices[seq as usize % 2];
            hub.show(&tenant, device, "pump", &point(&tenant, device, seq, None));
        }
        let (frames, chunks, ended) = written(&mut body);
        assert!(!ended);
        assert_eq!(chunks, 1, "every pending frame in one write");
        assert_eq!(frames.len(), 501);
        assert_eq!(frames[0]["type"], "hello");
        let seqs: Vec<i64> = frames[1..]
            .iter()
            .map(|f| f["messages"][0]["ts"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>());
        for frame in &frames[1..] {
            let seq = frame["messages"][0]["ts"].as_i64().unwrap();
            assert_eq!(frame["deviceId"], devices[seq as usize % 2].as_str());
        }
        assert_eq!(stats.frames_sent.load(Ordering::Relaxed), 501);
        assert_eq!(watch.queued_bytes(), 0);

        // Later frames come in a later write, still in order.
        tokio::time::advance(GATHER).await;
        for seq in 500..510 {
            hub.show(
                &tenant,
                &devices[0],
                "pump",
                &point(&tenant, &devices[0], seq, None),
            );
        }
        let (frames, chunks, _) = written(&mut body);
        assert_eq!(chunks, 1);
        let seqs: Vec<i64> = frames
            .iter()
            .map(|f| f["messages"][0]["ts"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (500..510).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_backlog_is_written_in_bounded_chunks_without_loss() {
        let hub = DashboardHub::default();
        let tenant = TenantId::parse("acme").unwrap();
        let device = DeviceId::parse("pump-1").unwrap();
        let (mut watch, frames) = hub.telemetry_watch(&tenant);
        watch.watch(std::slice::from_ref(&device)).unwrap();
        let stats = hub.session_stats(&watch, "key:test".into());
        let (_outbound, mut body) = LiveBody::new(frames, stats);
        // 1,000 frames of about 4 KB: more than one chunk, less than the backlog's 4 MiB.
        for seq in 0..1000 {
            hub.show(
                &tenant,
                &device,
                "pump",
                &point(&tenant, &device, seq, Some(4000)),
            );
        }
        assert_eq!(watch.take_missed(), 0);
        let (frames, chunks, _) = written(&mut body);
        assert!(chunks > 1, "{chunks}");
        let seqs: Vec<i64> = frames
            .iter()
            .map(|f| f["messages"][0]["ts"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn skipped_frames_are_reported_before_the_next_and_nothing_follows_the_close() {
        let hub = DashboardHub::default();
        let (tenant, device, _watch, stats, outbound, mut body) = watching_all(&hub);
        // 1,024 fit in the backlog; the next 6 are skipped, and reported before the next
        // frame the session takes.
        for seq in 0..1030 {
            hub.show(&tenant, &device, "pump", &point(&tenant, &device, seq, None));
        }
        let (frames, _, _) = written(&mut body);
        assert_eq!(frames.len(), 1 + 1024);
        assert_eq!(
            frames[0],
            serde_json::json!({"type": "lagged", "stream": "telemetry", "missed": 6})
        );
        let seqs: Vec<i64> = frames[1..]
            .iter()
            .map(|f| f["messages"][0]["ts"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (0..1024).collect::<Vec<_>>());
        assert_eq!(stats.frames_skipped.load(Ordering::Relaxed), 6);
        // With room again, nothing more is skipped.
        tokio::time::advance(GATHER).await;
        hub.show(&tenant, &device, "pump", &point(&tenant, &device, 2000, None));
        let (frames, _, _) = written(&mut body);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["messages"][0]["ts"], 2000);

        // The closing frame ends the body: telemetry still queued is not sent.
        tokio::time::advance(GATHER).await;
        hub.show(&tenant, &device, "pump", &point(&tenant, &device, 2001, None));
        outbound
            .try_send(Message::Close(Some(actix_http::ws::CloseCode::Policy.into())))
            .unwrap();
        let (frames, _, ended) = written(&mut body);
        assert!(ended);
        assert_eq!(frames, vec![serde_json::json!({"close": true})]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_stream_is_written_once_per_interval_and_answers_are_not_held_back() {
        let hub = DashboardHub::default();
        let (tenant, device, watch, _stats, outbound, mut body) = watching_all(&hub);
        let show = |range: std::ops::Range<i64>| {
            for seq in range {
                hub.show(&tenant, &device, "pump", &point(&tenant, &device, seq, None));
            }
        };
        let seqs = |frames: &[serde_json::Value]| -> Vec<i64> {
            frames
                .iter()
                .filter_map(|f| f["messages"][0]["ts"].as_i64())
                .collect()
        };

        // After a quiet spell the first frame goes out at once.
        show(0..1);
        let (frames, chunks, _) = written(&mut body);
        assert_eq!((chunks, seqs(&frames)), (1, vec![0]));
        // Frames arriving right after it gather until the interval is over ...
        show(1..40);
        let (frames, chunks, _) = written(&mut body);
        assert_eq!((chunks, frames.len()), (0, 0), "held until the interval ends");
        // ... while the actor's frames are written at once.
        outbound
            .try_send(Message::Text(r#"{"type":"subscribed"}"#.into()))
            .unwrap();
        let (frames, chunks, _) = written(&mut body);
        assert_eq!(chunks, 1);
        assert_eq!(frames, vec![serde_json::json!({"type": "subscribed"})]);
        tokio::time::advance(GATHER).await;
        let (frames, chunks, _) = written(&mut body);
        assert_eq!((chunks, seqs(&frames)), (1, (1..40).collect::<Vec<_>>()));
        // Nothing came during the next interval: the body waits on the backlog again, and the
        // next frame is written as soon as it is queued.
        tokio::time::advance(GATHER).await;
        let (frames, chunks, _) = written(&mut body);
        assert_eq!((chunks, frames.len()), (0, 0));
        show(40..41);
        let (frames, chunks, _) = written(&mut body);
        assert_eq!((chunks, seqs(&frames)), (1, vec![40]));
        assert_eq!(watch.take_missed(), 0);
    }
}
