//! The limit on inbound messages in flight, in place of ntex-mqtt's own middleware.
//!
//! ntex-mqtt puts `InFlightService` in front of each connection's dispatcher: a packet is
//! read only while fewer than `max_receive` (MQTT 3.1.1; MQTT 5 enforces Receive Maximum
//! itself) and fewer than `max_receive_size` bytes of inbound messages are being handled.
//! This is the same limit, with one difference that matters at scale: how long its readiness
//! check keeps its memory.
//!
//! The connection's dispatcher holds the readiness check of the service in front of it in a
//! box made once per connection, sized for the check's largest state and kept for the
//! connection's life (`ntex_service::PipelineBinding`). ntex-mqtt's middleware awaits the
//! readiness of everything behind it inline (the dispatcher's publish and control services,
//! the control buffer, the in-flight counters), so that box was 2,152 bytes per connection,
//! held by every idle device. Here the check is polled on the stack, and only one that has to
//! wait is kept, in a box of its own freed once the services are ready: what stays with the
//! connection is a pointer.

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Context, Poll};

use ntex::service::{Middleware, Service, ServiceCtx};
use ntex::task::LocalWaker;
use ntex::util::join;
use ntex_mqtt::SizedRequest;

/// Builds [`InFlightService`] around each connection's dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// Messages being handled at once; 0: no limit by count.
    max_count: u16,
    /// Bytes of messages being handled at once; 0: no limit by size.
    max_size: usize,
}

impl InFlight {
    /// MQTT 3.1.1: both limits, as ntex-mqtt's v3 server sets them.
    pub fn new(max_count: u16, max_size: usize) -> Self {
        InFlight { max_count, max_size }
    }
}

impl<S, C> Middleware<S, C> for InFlight {
    type Service = InFlightService<S>;

    fn create(&self, service: S, _: C) -> Self::Service {
        InFlightService {
            service,
            publish: Cell::new(false),
            count: Rc::new(Counter {
                max_count: self.max_count,
                max_size: self.max_size,
                count: Cell::new(0),
                size: Cell::new(0),
                task: LocalWaker::new(),
            }),
        }
    }
}

pub struct InFlightService<S> {
    count: Rc<Counter>,
    service: S,
    /// A PUBLISH is being handled: its payload chunks pass whatever the count.
    publish: Cell<bool>,
}

impl<S, R> Service<R> for InFlightService<S>
where
    S: Service<R>,
    R: SizedRequest + 'static,
{
    type Response = S::Response;
    type Error = S::Error;

    async fn ready(&self, ctx: ServiceCtx<'_, Self>) -> Result<(), S::Error> {
        // Nearly every check is ready at once: it is polled in place, on the stack, and
        // nothing is kept. One that has to wait is dropped (ntex's readiness checks are made
        // to be dropped while pending) and made again in a box that lives while it waits.
        let at_once = poll_fn(|cx| {
            let check = std::pin::pin!(self.check(ctx));
            Poll::Ready(match check.poll(cx) {
                Poll::Ready(result) => Some(result),
                Poll::Pending => None,
            })
        })
        .await;
        match at_once {
            Some(result) => result,
            None => Box::pin(self.check(ctx)).await,
        }
    }

    async fn call(&self, req: R, ctx: ServiceCtx<'_, Self>) -> Result<S::Response, S::Error> {
        if self.publish.get() && !req.is_chunk() {
            self.publish.set(false);
        }
        if req.is_publish() {
            self.publish.set(true);
        }
        let size = if self.count.max_size > 0 { req.size() } else { 0 };
        let _guard = CounterGuard::new(size, self.count.clone());
        ctx.call(&self.service, req).await
    }

    ntex::forward_poll!(service);
    ntex::forward_shutdown!(service);
}

impl<S> InFlightService<S> {
    async fn check<R>(&self, ctx: ServiceCtx<'_, Self>) -> Result<(), S::Error>
    where
        S: Service<R>,
    {
        if self.publish.get() || self.count.has_room() {
            ctx.ready(&self.service).await
        } else {
            join(self.count.available(), ctx.ready(&self.service)).await.1
        }
    }
}

struct Counter {
    max_count: u16,
    max_size: usize,
    count: Cell<u16>,
    size: Cell<usize>,
    task: LocalWaker,
}

impl Counter {
    fn has_room(&self) -> bool {
        (self.max_count == 0 || self.count.get() < self.max_count)
            && (self.max_size == 0 || self.size.get() <= self.max_size)
    }

    async fn available(&self) {
        poll_fn(|cx: &mut Context<'_>| {
            self.task.register(cx.waker());
            if self.has_room() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// One message in flight: counted while it lives.
struct CounterGuard(u32, Rc<Counter>);

impl CounterGuard {
    fn new(size: u32, inner: Rc<Counter>) -> Self {
        let count = inner.count.get() + 1;
        inner.count.set(count);
        let total = inner.size.get() + size as usize;
        inner.size.set(total);
        if count == inner.max_count || total >= inner.max_size {
            inner.task.wake();
        }
        CounterGuard(size, inner)
    }
}

impl Drop for CounterGuard {
    fn drop(&mut self) {
        let inner = &self.1;
        let count = inner.count.get();
        inner.count.set(count - 1);
        let size = inner.size.get();
        let remaining = size - self.0 as usize;
        inner.size.set(remaining);
        if count == inner.max_count || (size > inner.max_size && remaining <= inner.max_size) {
            inner.task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use ntex::channel::oneshot;
    use ntex::service::{Middleware, Pipeline, Service, ServiceCtx};
    use ntex::time::{Millis, sleep, timeout};
    use ntex::util::lazy;

    use super::*;

    /// A request of a given size, held by the service until its sender fires.
    struct Req(u32, Option<oneshot::Receiver<()>>, Kind);

    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Packet,
        Publish,
        Chunk,
    }

    impl SizedRequest for Req {
        fn size(&self) -> u32 {
            self.0
        }
        fn is_publish(&self) -> bool {
            self.2 == Kind::Publish
        }
        fn is_chunk(&self) -> bool {
            self.2 == Kind::Chunk
        }
    }

    /// Holds each request until released.
    struct Hold;

    impl Service<Req> for Hold {
        type Response = ();
        type Error = ();

        async fn call(&self, req: Req, _: ServiceCtx<'_, Self>) -> Result<(), ()> {
            if let Some(rx) = req.1 {
                let _ = rx.await;
            }
            Ok(())
        }
    }

    /// Starts a request that stays in flight until the returned sender fires.
    fn hold(pl: &Pipeline<InFlightService<Hold>>, size: u32) -> oneshot::Sender<()> {
        hold_kind(pl, size, Kind::Packet)
    }

    fn hold_kind(pl: &Pipeline<InFlightService<Hold>>, size: u32, kind: Kind) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        let pl = pl.clone();
        ntex::rt::spawn(async move { pl.call_nowait(Req(size, Some(rx), kind)).await });
        tx
    }

    async fn becomes_ready(pl: &Pipeline<InFlightService<Hold>>) {
        let binding = pl.clone().bind();
        timeout(Millis(1000), poll_fn(|cx| binding.poll_ready(cx)))
            .await
            .expect("ready again within a second")
            .unwrap();
    }

    async fn is_ready_now(pl: &Pipeline<InFlightService<Hold>>) -> bool {
        let binding = pl.clone().bind();
        lazy(|cx| binding.poll_ready(cx)).await.is_ready()
    }

    #[ntex::test]
    async fn the_count_limit_holds_reading_until_a_message_completes() {
        let pl = Pipeline::new(InFlight::new(2, 0).create(Hold, ()));
        assert!(is_ready_now(&pl).await);
        let first = hold(&pl, 10);
        assert!(is_ready_now(&pl).await, "one of two in flight");
        let _second = hold(&pl, 10);
        sleep(Millis(20)).await;
        assert!(!is_ready_now(&pl).await, "two of two in flight");
        first.send(()).unwrap();
        becomes_ready(&pl).await;
    }

    #[ntex::test]
    async fn the_size_limit_holds_reading_until_bytes_are_released() {
        let pl = Pipeline::new(InFlight::new(0, 100).create(Hold, ()));
        let big = hold(&pl, 150);
        sleep(Millis(20)).await;
        assert!(!is_ready_now(&pl).await, "150 bytes in flight of 100");
        big.send(()).unwrap();
        becomes_ready(&pl).await;

        // No limit by count: many small messages in flight keep it ready.
        let held: Vec<_> = (0..50).map(|_| hold(&pl, 1)).collect();
        sleep(Millis(20)).await;
        assert!(is_ready_now(&pl).await, "50 bytes in flight of 100");
        drop(held);
    }

    #[ntex::test]
    async fn the_chunks_of_a_publish_pass_the_count_limit_until_the_next_packet() {
        let pl = Pipeline::new(InFlight::new(1, 0).create(Hold, ()));
        let _publish = hold_kind(&pl, 10, Kind::Publish);
        sleep(Millis(20)).await;
        assert!(
            is_ready_now(&pl).await,
            "a publish's payload chunks must not wait for it"
        );
        let _chunk = hold_kind(&pl, 10, Kind::Chunk);
        sleep(Millis(20)).await;
        assert!(is_ready_now(&pl).await, "still inside the publish");
        let _next = hold_kind(&pl, 10, Kind::Packet);
        sleep(Millis(20)).await;
        assert!(
            !is_ready_now(&pl).await,
            "the publish is over: three of one in flight"
        );
    }

    /// Readiness that holds 4 KiB across a wait, like a deep chain of services awaited inline.
    struct DeepReady;

    impl Service<Req> for DeepReady {
        type Response = ();
        type Error = ();

        async fn ready(&self, _: ServiceCtx<'_, Self>) -> Result<(), ()> {
            let state = [7u8; 4096];
            sleep(Millis(1)).await;
            std::hint::black_box(&state);
            Ok(())
        }

        async fn call(&self, _: Req, _: ServiceCtx<'_, Self>) -> Result<(), ()> {
            Ok(())
        }
    }

    #[ntex::test]
    async fn the_readiness_a_connection_keeps_does_not_grow_with_the_services_behind() {
        let bare = Pipeline::new(DeepReady);
        let bare_size = size_of_val(&bare.ready());
        assert!(bare_size > 4096, "the inner readiness is {bare_size} bytes");

        let pl = Pipeline::new(InFlight::new(16, 65_536).create(DeepReady, ()));
        let size = size_of_val(&pl.ready());
        assert!(size < 256, "the readiness a connection keeps is {size} bytes");
        // and it still waits for the service behind it
        pl.ready().await.unwrap();
        pl.call(Req(1, None, Kind::Packet)).await.unwrap();
    }
}
