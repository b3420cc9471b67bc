//! Raw MQTT packets, for tests that need what no client library sends (malformed or oversized
//! input, floods of refused connections).

/// An MQTT 3.1.1 CONNECT with username, password, keep-alive and an optional will.
pub fn connect_packet(
    client_id: &str,
    username: &str,
    password: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut flags = 0b1100_0010u8; // username, password, clean session
    if will.is_some() {
        flags |= 0b0000_0100;
    }
    let mut body = string("MQTT");
    body.push(4);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(string(client_id));
    if let Some((topic, message)) = will {
        body.extend(string(topic));
        body.extend(string(message));
    }
    body.extend(string(username));
    body.extend(string(password));
    packet(0x10, body)
}

/// An MQTT 5.0 CONNECT with a client id only (no credentials, no properties).
pub fn connect_v5_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(0b0000_0010); // clean start
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0); // no properties
    body.extend(string(client_id));
    packet(0x10, body)
}

pub fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

/// A UTF-8 string as MQTT encodes it: a two-byte length, then the bytes.
pub fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A packet: first byte, remaining length, body.
pub fn packet(first_byte: u8, body: Vec<u8>) -> Vec<u8> {
    let mut packet = vec![first_byte];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    packet
}

/// Reads one packet: (first byte, body). `None` when the peer closed the connection or nothing
/// came within the stream's read timeout.
pub fn read_packet(stream: &mut std::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).ok()?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some((first[0], body))
}
