//! A minimal HTTP receiver standing in for webhook and SMS gateway endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One HTTP request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// What [`http_receiver`] returns: its address, the requests it got, and how many.
pub type Receiver = (SocketAddr, mpsc::UnboundedReceiver<Received>, Arc<AtomicUsize>);

/// A minimal HTTP/1.1 server on 127.0.0.1 answering every request with `status`.
pub async fn http_receiver(status: u16) -> Receiver {
    http_receiver_on("127.0.0.1", status, "").await
}

/// As [`http_receiver`], listening on `ip` (any of 127.0.0.0/8 is loopback) and adding
/// `headers` (each line ending in `\r\n`, e.g. a `Location`) to every answer.
pub async fn http_receiver_on(ip: &str, status: u16, headers: &str) -> Receiver {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let extra = headers.to_string();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let counter = counter.clone();
            let extra = extra.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let header_end = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
                let mut lines = head.lines();
                let path = lines
                    .next()
                    .unwrap_or("")
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let length: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < header_end + length {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(Received {
                    path,
                    headers,
                    body: buf[header_end..].to_vec(),
                });
                let reply =
                    format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: 2\r\nConnection: close\r\n\r\nok");
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, rx, hits)
}
