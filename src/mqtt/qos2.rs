//! Inbound QoS 2, completed below ntex-mqtt.
//!
//! MQTT 3.1.1 and 5.0 §4.3.3: until the receiver gets PUBREL it answers any PUBLISH with the
//! same packet id with PUBREC and does not deliver the message again; PUBREL frees the id.
//! ntex-mqtt 8.2 gets this wrong in three ways: a resend before PUBREL closes a 3.1.1
//! connection and gets PUBACK 0x91 on 5.0; on 5.0 it never frees a QoS 2 id, so a reused id
//! gets 0x91 and the 65th QoS 2 message of a connection (Receive Maximum 64) closes it with
//! DISCONNECT 0x93; and a PUBREL for a message accepted before a reconnect closes a 3.1.1
//! connection.
//!
//! This I/O layer sits under the codec and reads only the framing of packets. It hands an
//! inbound QoS 2 PUBLISH to ntex-mqtt as QoS 1 (the broker learns the real QoS from
//! [`Qos2Link::exactly_once`]), turns the PUBACK ntex-mqtt answers into the PUBREC it means,
//! answers resends and PUBREL itself, and frees the id at PUBREL. PUBACK and PUBREC have the
//! same layout in both protocol versions (id, then 5.0's reason code and properties), so the
//! answer is the packet ntex-mqtt wrote with another type.
//!
//! It also hands every PUBLISH up whole (up to the packet size limit). ntex-mqtt's codec
//! decodes a PUBLISH whose payload has not fully arrived into the header plus later payload
//! chunks, and its dispatcher may run a chunk before the handler of the PUBLISH it belongs to
//! when that handler's predecessor is still waiting (a QoS 1 PUBACK held back for the telemetry
//! writers or a slow subscriber): the connection then stalls or is closed with
//! `UnexpectedPayload`. A whole packet is decoded in one piece.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use ntex::io::{FilterBuf, FilterLayer};
use ntex::util::{BytePages, BytesMut};

use super::session::Session;

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREL: u8 = 6;
/// PUBREC and PUBCOMP packets' first bytes.
const PUBREC: u8 = 0x50;
const PUBCOMP: u8 = 0x70;
/// MQTT 5 PUBCOMP reason: Packet Identifier not found.
const PACKET_ID_NOT_FOUND: u8 = 0x92;

/// Where a scanner is in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// At the start of a packet.
    Boundary,
    /// Inside a packet that passes: this many bytes of it are still to come.
    Forward(usize),
    /// Inside a packet answered here: this many bytes are still to drop.
    Drop(usize),
    /// The framing made no sense: everything passes, and the codec refuses it.
    Opaque,
}

/// Where an inbound QoS 2 packet id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdState {
    /// Handed up as QoS 1; ntex-mqtt's PUBACK not written yet.
    Processing,
    /// PUBREC sent; waiting for PUBREL.
    Received,
}

/// The fixed header at the start of `buf`: first byte, header length, remaining length.
/// `None` while incomplete; `Err` when the remaining length is malformed.
fn fixed_header(buf: &[u8]) -> Option<Result<(u8, usize, usize), ()>> {
    let first = *buf.first()?;
    let mut length = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        length |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(Ok((first, 2 + i, length)));
        }
    }
    Some(Err(()))
}

/// The QoS 2 receiver of one connection: pure, fed with whatever the socket delivered and
/// whatever ntex-mqtt wrote.
#[derive(Debug)]
pub struct Qos2Exchange {
    inbound: Position,
    outbound: Position,
    mqtt5: bool,
    ids: HashMap<u16, IdState>,
    /// How many of `ids` are [`IdState::Processing`]: without one, writes pass unscanned.
    processing: usize,
    /// Answers waiting for the outbound stream to reach a packet boundary.
    pending: Vec<u8>,
    /// A PUBLISH up to this many bytes (the packet size limit) is handed up only whole; a
    /// larger one goes up at once, and the codec refuses it.
    whole_publish_max: usize,
}

impl Default for Qos2Exchange {
    fn default() -> Self {
        Qos2Exchange {
            inbound: Position::Boundary,
            outbound: Position::Boundary,
            mqtt5: false,
            ids: HashMap::new(),
            processing: 0,
            pending: Vec::new(),
            whole_publish_max: usize::MAX,
        }
    }
}

impl Qos2Exchange {
    /// Whether the QoS 1 PUBLISH `id` handed up is really QoS 2.
    pub fn exactly_once(&self, id: u16) -> bool {
        self.ids.get(&id) == Some(&IdState::Processing)
    }

    /// Inbound bytes: moves what goes up from `src` to `dst`, queues answers. `release` frees
    /// an id in the session and tells whether it was accepted there (a PUBREL for a message
    /// taken before a reconnect). Bytes of a packet head too short to decide on stay in `src`.
    pub fn read(&mut self, src: &mut BytesMut, dst: &mut BytesMut, mut release: impl FnMut(u16) -> bool) {
        // Bytes at the front of `src` that go up unchanged, moved in one piece (usually the
        // whole read, without a copy).
        let mut passed = 0;
        while passed < src.len() {
            match self.inbound {
                Position::Opaque => passed = src.len(),
                Position::Forward(left) => {
                    let n = left.min(src.len() - passed);
                    passed += n;
                    self.inbound = if n == left {
                        Position::Boundary
                    } else {
                        Position::Forward(left - n)
                    };
                }
                Position::Drop(left) => {
                    pass_up(src, dst, &mut passed);
                    let n = left.min(src.len());
                    src.advance_to(n);
                    self.inbound = if n == left {
                        Position::Boundary
                    } else {
                        Position::Drop(left - n)
                    };
                }
                Position::Boundary => {
                    let view = &src[passed..];
                    let Some(header) = fixed_header(view) else { break };
                    let Ok((first, header_len, remaining)) = header else {
                        self.inbound = Position::Opaque;
                        continue;
                    };
                    let total = header_len + remaining;
                    let body = &view[header_len..];
                    if first >> 4 == PUBLISH && view.len() < total && total <= self.whole_publish_max {
                        break;
                    }
                    match first >> 4 {
                        CONNECT => {
                            // Protocol name "MQTT" (2 + 4 bytes), then the level.
                            if body.len() < 7 && remaining >= 7 {
                                break;
                            }
                            self.mqtt5 = body.get(6) == Some(&5);
                            self.inbound = Position::Forward(total);
                        }
                        PUBLISH if (first >> 1) & 0b11 == 2 => {
                            if body.len() < 2 {
                                break;
                            }
                            let id_at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
                            if id_at + 2 > remaining {
                                // Malformed: the codec refuses it.
                                self.inbound = Position::Forward(total);
                                continue;
                            }
                            if body.len() < id_at + 2 {
                                break;
                            }
                            let id = u16::from_be_bytes([body[id_at], body[id_at + 1]]);
                            match self.ids.get(&id) {
                                None => {
                                    self.ids.insert(id, IdState::Processing);
                                    self.processing += 1;
                                    pass_up(src, dst, &mut passed);
                                    // QoS 1 for ntex-mqtt: QoS bits 10 become 01.
                                    dst.extend_from_slice(&[(first & !0b0110) | 0b0010]);
                                    src.advance_to(1);
                                    self.inbound = Position::Forward(total - 1);
                                }
                                // The first copy is still being handled: its PUBREC follows.
                                Some(IdState::Processing) => self.inbound = Position::Drop(total),
                                Some(IdState::Received) => {
                                    self.answer(PUBREC, id, None);
                                    self.inbound = Position::Drop(total);
                                }
                            }
                        }
                        PUBREL if remaining >= 2 => {
                            if body.len() < 2 {
                                break;
                            }
                            let id = u16::from_be_bytes([body[0], body[1]]);
                            let known = match self.ids.get(&id) {
                                Some(IdState::Processing) => false,
                                Some(IdState::Received) => {
                                    self.ids.remove(&id);
                                    release(id);
                                    true
                                }
                                None => release(id),
                            };
                            // MQTT 3.1.1 has no reason codes: PUBCOMP whatever the id.
                            let reason = (!known && self.mqtt5).then_some(PACKET_ID_NOT_FOUND);
                            self.answer(PUBCOMP, id, reason);
                            self.inbound = Position::Drop(total);
                        }
                        _ => self.inbound = Position::Forward(total),
                    }
                }
            }
        }
        pass_up(src, dst, &mut passed);
    }

    fn answer(&mut self, kind: u8, id: u16, reason: Option<u8>) {
        let [hi, lo] = id.to_be_bytes();
        match reason {
            Some(code) => self.pending.extend_from_slice(&[kind, 3, hi, lo, code]),
            None => self.pending.extend_from_slice(&[kind, 2, hi, lo]),
        }
    }

    /// Outbound bytes: moves `src` to `dst`, PUBACKs of QoS 2 messages turned into PUBRECs,
    /// then the answers queued by [`Qos2Exchange::read`].
    pub fn write(&mut self, src: &mut BytePages, dst: &mut BytePages) {
        // Nothing in flight: nothing to rewrite (the common case, no scanning).
        if self.outbound == Position::Boundary && self.processing == 0 {
            src.move_to(dst);
        }
        while !src.is_empty() {
            match self.outbound {
                Position::Opaque => src.move_to(dst),
                Position::Forward(left) | Position::Drop(left) => {
                    let n = left.min(src.len());
                    src.split_into(n, dst);
                    self.outbound = if n == left {
                        Position::Boundary
                    } else {
                        Position::Forward(left - n)
                    };
                }
                Position::Boundary => {
                    let head = peek(src, 5);
                    let Some(header) = fixed_header(&head) else { break };
                    let Ok((first, header_len, remaining)) = header else {
                        self.outbound = Position::Opaque;
                        continue;
                    };
                    let total = header_len + remaining;
                    if first >> 4 == PUBACK && remaining >= 2 {
                        let packet = peek(src, total);
                        if packet.len() < total {
                            break;
                        }
                        let id = u16::from_be_bytes([packet[header_len], packet[header_len + 1]]);
                        if self.exactly_once(id) {
                            self.processing -= 1;
                            let refused = remaining > 2 && packet[header_len + 2] >= 0x80;
                            if refused {
                                // A refusal ends the exchange (MQTT 5 §4.3.3).
                                self.ids.remove(&id);
                            } else {
                                self.ids.insert(id, IdState::Received);
                            }
                            let mut pubrec = packet;
                            pubrec[0] = PUBREC;
                            dst.extend_from_slice(&pubrec);
                            src.advance_to(total);
                            continue;
                        }
                    }
                    self.outbound = Position::Forward(total);
                }
            }
        }
        if self.outbound == Position::Boundary && !self.pending.is_empty() {
            dst.extend_from_slice(&self.pending);
            self.pending.clear();
        }
    }
}

/// Moves the first `passed` bytes of `src` to `dst`: the whole buffer without a copy when it
/// can.
fn pass_up(src: &mut BytesMut, dst: &mut BytesMut, passed: &mut usize) {
    if *passed == 0 {
        return;
    }
    if dst.is_empty() && *passed == src.len() {
        std::mem::swap(src, dst);
    } else {
        dst.extend_from_slice(&src[..*passed]);
        src.advance_to(*passed);
    }
    *passed = 0;
}

/// Up to `n` bytes from the front of `pages`.
fn peek(pages: &BytePages, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for page in pages.iter() {
        let take = (n - out.len()).min(page.len());
        out.extend_from_slice(&page[..take]);
        if out.len() == n {
            break;
        }
    }
    out
}

/// A connection's view of its [`Qos2Exchange`], found through `Io::query` at the handshake.
#[derive(Clone, Default)]
pub struct Qos2Link {
    exchange: Rc<RefCell<Qos2Exchange>>,
    session: Rc<RefCell<Option<Arc<Session>>>>,
}

impl Qos2Link {
    /// The session whose accepted QoS 2 ids a PUBREL frees.
    pub fn attach(&self, session: Arc<Session>) {
        *self.session.borrow_mut() = Some(session);
    }

    /// Whether the QoS 1 PUBLISH `id` that ntex-mqtt hands up is really QoS 2.
    pub fn exactly_once(&self, id: u16) -> bool {
        self.exchange.borrow().exactly_once(id)
    }

    /// Frees `id` in the session; whether the session had accepted it.
    fn release(&self, id: u16) -> bool {
        self.session
            .borrow()
            .as_ref()
            .is_some_and(|session| session.state.lock().qos2_pending.remove(&id))
    }
}

/// The I/O layer around a connection's [`Qos2Exchange`].
#[derive(Default)]
pub struct Qos2Layer {
    link: Qos2Link,
}

impl Qos2Layer {
    /// A layer that hands PUBLISH packets of up to `max_packet_size` bytes up whole.
    pub fn new(max_packet_size: u32) -> Self {
        let layer = Qos2Layer::default();
        // The fixed header (up to 5 bytes) is not part of MQTT's remaining length.
        layer.link.exchange.borrow_mut().whole_publish_max = max_packet_size as usize + 5;
        layer
    }
}

impl std::fmt::Debug for Qos2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qos2Layer").finish_non_exhaustive()
    }
}

impl FilterLayer for Qos2Layer {
    fn query(&self, id: std::any::TypeId) -> Option<Box<dyn std::any::Any>> {
        (id == std::any::TypeId::of::<Qos2Link>())
            .then(|| Box::new(self.link.clone()) as Box<dyn std::any::Any>)
    }

    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        let answered = buf.with_read_buffers(|src, dst| {
            let Some(src) = src.as_mut() else {
                return false;
            };
            let mut exchange = self.link.exchange.borrow_mut();
            exchange.read(src, dst, |id| self.link.release(id));
            !exchange.pending.is_empty()
        });
        if answered {
            // Written now: the answers go out without waiting for ntex-mqtt to write.
            buf.with_write_buffers(|src, dst| self.link.exchange.borrow_mut().write(src, dst));
        }
        Ok(())
    }

    fn process_write_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_write_buffers(|src, dst| self.link.exchange.borrow_mut().write(src, dst));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            out.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                return [out, body.to_vec()].concat();
            }
        }
    }

    fn publish(qos: u8, id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
        let body = [&[0, 1, b't'][..], &id.to_be_bytes(), payload].concat();
        packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &body)
    }

    fn ack(first: u8, id: u16, reason: Option<u8>) -> Vec<u8> {
        let [hi, lo] = id.to_be_bytes();
        match reason {
            Some(code) => vec![first, 3, hi, lo, code],
            None => vec![first, 2, hi, lo],
        }
    }

    fn connect(level: u8) -> Vec<u8> {
        packet(0x10, &[0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60, 0, 0])
    }

    /// Feeds `input` in chunks of `chunk` bytes; returns what went up.
    fn read(x: &mut Qos2Exchange, input: &[u8], chunk: usize, accepted: &[u16]) -> Vec<u8> {
        let mut src = BytesMut::new();
        let mut dst = BytesMut::new();
        for piece in input.chunks(chunk) {
            src.extend_from_slice(piece);
            x.read(&mut src, &mut dst, |id| accepted.contains(&id));
        }
        assert!(src.is_empty(), "nothing left behind");
        dst.to_vec()
    }

    /// What reaches the socket when ntex-mqtt writes `written`.
    fn write(x: &mut Qos2Exchange, written: &[u8]) -> Vec<u8> {
        let mut src = BytePages::default();
        src.extend_from_slice(written);
        let mut dst = BytePages::default();
        x.write(&mut src, &mut dst);
        assert!(src.is_empty());
        dst.freeze().to_vec()
    }

    #[test]
    fn a_publish_goes_up_only_whole_unless_it_is_over_the_size_limit() {
        let layer = Qos2Layer::new(1024);
        let mut x = layer.link.exchange.borrow_mut();
        let first = publish(1, 7, false, &[b'p'; 600]);
        let second = publish(0, 0, false, &[b'q'; 300]);
        let stream = [first.clone(), second.clone()].concat();
        let mut src = BytesMut::new();
        let mut dst = BytesMut::new();
        let mut seen = Vec::new();
        for piece in stream.chunks(100) {
            src.extend_from_slice(piece);
            x.read(&mut src, &mut dst, |_| false);
            if !dst.is_empty() {
                seen.push(dst.to_vec());
                dst.clear();
            }
        }
        assert_eq!(seen, vec![first, second], "each packet went up in one piece");
        assert!(src.is_empty());
        // Over the limit: its head goes up at once, for the codec to refuse.
        let big = publish(1, 8, false, &[b'b'; 2000]);
        let mut src = BytesMut::from(&big[..100]);
        let mut dst = BytesMut::new();
        x.read(&mut src, &mut dst, |_| false);
        assert_eq!(dst.to_vec(), big[..100].to_vec());
    }

    #[test]
    fn qos2_goes_up_as_qos1_and_its_puback_goes_out_as_pubrec() {
        for level in [4, 5] {
            for chunk in [1, 3, 1000] {
                let mut x = Qos2Exchange::default();
                let first = publish(2, 7, false, b"hello");
                let input = [connect(level), first.clone()].concat();
                let up = read(&mut x, &input, chunk, &[]);
                assert_eq!(up, [connect(level), publish(1, 7, false, b"hello")].concat());
                assert!(x.exactly_once(7));
                // A resend while the first copy is handled is dropped.
                assert!(read(&mut x, &publish(2, 7, true, b"hello"), chunk, &[]).is_empty());
                // ntex-mqtt's PUBACK (5.0: with a reason code) leaves as PUBREC.
                let out = write(&mut x, &[ack(0x40, 7, Some(0)), vec![0xD0, 0]].concat());
                assert_eq!(out, [ack(0x50, 7, Some(0)), vec![0xD0, 0]].concat());
                assert!(!x.exactly_once(7));
                // Resends before PUBREL: PUBREC again, nothing goes up.
                for _ in 0..2 {
                    assert!(read(&mut x, &publish(2, 7, true, b"hello"), chunk, &[]).is_empty());
                    assert_eq!(write(&mut x, &[]), ack(0x50, 7, None));
                }
                // PUBREL: PUBCOMP, and the id is free for a new message.
                assert!(read(&mut x, &ack(0x62, 7, None), chunk, &[]).is_empty());
                assert_eq!(write(&mut x, &[]), ack(0x70, 7, None));
                assert_eq!(read(&mut x, &first, chunk, &[]), publish(1, 7, false, b"hello"));
            }
        }
    }

    #[test]
    fn pubrel_after_a_reconnect_and_unknown_ids() {
        // Accepted by the session before the reconnect: PUBCOMP.
        let mut x = Qos2Exchange::default();
        read(&mut x, &connect(5), 100, &[]);
        assert!(read(&mut x, &ack(0x62, 3, None), 100, &[3]).is_empty());
        assert_eq!(write(&mut x, &[]), ack(0x70, 3, None));
        // Unknown: MQTT 5 says so, MQTT 3.1.1 completes it anyway.
        assert!(read(&mut x, &ack(0x62, 4, None), 100, &[]).is_empty());
        assert_eq!(write(&mut x, &[]), ack(0x70, 4, Some(0x92)));
        let mut x = Qos2Exchange::default();
        read(&mut x, &connect(4), 100, &[]);
        read(&mut x, &ack(0x62, 4, None), 100, &[]);
        assert_eq!(write(&mut x, &[]), ack(0x70, 4, None));
    }

    #[test]
    fn a_refused_qos2_message_frees_its_id() {
        let mut x = Qos2Exchange::default();
        read(
            &mut x,
            &[connect(5), publish(2, 9, false, b"x")].concat(),
            100,
            &[],
        );
        assert_eq!(write(&mut x, &ack(0x40, 9, Some(0x87))), ack(0x50, 9, Some(0x87)));
        assert_eq!(
            read(&mut x, &publish(2, 9, false, b"y"), 100, &[]),
            publish(1, 9, false, b"y")
        );
    }

    #[test]
    fn everything_else_passes_unchanged() {
        let big = publish(1, 3, false, &vec![b'z'; 300_000]);
        let input = [
            connect(4),
            big.clone(),
            publish(0, 0, false, b"q0"),
            vec![0xC0, 0],
        ]
        .concat();
        for chunk in [7, 4096, 1 << 20] {
            assert_eq!(read(&mut Qos2Exchange::default(), &input, chunk, &[]), input);
        }
        // QoS 1 acknowledgements pass as they are, also while a QoS 2 message is handled.
        let mut x = Qos2Exchange::default();
        read(&mut x, &publish(2, 1, false, b"x"), 100, &[]);
        let out = [big, ack(0x40, 2, None), ack(0x90, 5, Some(1))].concat();
        assert_eq!(write(&mut x, &out), out);
        // A malformed remaining length: everything goes up and the codec refuses it.
        let bad = vec![0x34, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 1, 2, 3];
        assert_eq!(read(&mut Qos2Exchange::default(), &bad, 2, &[]), bad);
    }
}
