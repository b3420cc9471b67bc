//! Reading JSON text frames from a WebSocket in tests.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame as JSON, within `wait` (pings and other frames are skipped, and do not
/// restart the wait).
pub async fn next_json(socket: &mut Socket, wait: Duration) -> Value {
    let text = tokio::time::timeout(wait, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return text,
                Some(Ok(_)) => continue,
                other => panic!("the socket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a frame in time");
    serde_json::from_str(&text).expect("JSON frame")
}

/// Sends `frame` and returns the next JSON frame.
pub async fn request(socket: &mut Socket, frame: &str, wait: Duration) -> Value {
    socket.send(Message::text(frame)).await.unwrap();
    next_json(socket, wait).await
}
