//! `drover-load monitor`: connects to Drover's live stream (`/ws`) and prints alarms as they
//! open, escalate, get acknowledged and clear. Reconnects (with a pause) when the stream drops.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Where the stream is and how to print it.
pub struct MonitorOptions {
    pub url: String,
    pub token: String,
    /// Print each frame as received (one JSON object a line) instead of a table row.
    pub json: bool,
    /// Also print updates (repeats that raised the severity).
    pub updates: bool,
    /// Stop after this many alarm lines (0: run until interrupted).
    pub count: u64,
}

/// The WebSocket URL of a Drover HTTP base URL.
pub fn stream_url(base: &str, token: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{ws}/ws?token={token}")
}

/// One printed line for an alarm frame, or `None` for frames that are not shown.
pub fn format_line(frame: &Value, updates: bool) -> Option<String> {
    match frame["type"].as_str()? {
        "hello" => Some(format!(
            "connected to tenant {}",
            frame["tenant"].as_str().unwrap_or("?")
        )),
        "lagged" => Some(format!(
            "(missed {} events: this monitor fell behind)",
            frame["missed"]
        )),
        "alarm" => {
            let event = frame["event"].as_str().unwrap_or("?");
            if event == "updated" && !updates {
                return None;
            }
            let a = &frame["alarm"];
            let value = a["value"]
                .as_f64()
                .map(|v| format!(" value={v}"))
                .unwrap_or_default();
            Some(format!(
                "{:<25} {:<12} {:<9} {:<14} {:<20} {} count={}{} step={} id={}",
                a["lastSeen"].as_str().unwrap_or(""),
                event.to_uppercase(),
                a["severity"].as_str().unwrap_or(""),
                a["status"].as_str().unwrap_or(""),
                a["deviceId"].as_str().unwrap_or(""),
                a["ruleName"].as_str().unwrap_or(""),
                a["count"],
                value,
                a["escalationStep"],
                a["id"].as_str().unwrap_or(""),
            ))
        }
        _ => None,
    }
}

pub async fn run(options: MonitorOptions) -> anyhow::Result<()> {
    let url = stream_url(&options.url, &options.token);
    let mut printed = 0u64;
    loop {
        let (mut stream, _) = match tokio_tungstenite::connect_async(&url).await {
            Ok(s) => s,
            Err(error) => {
                eprintln!("cannot connect to {}/ws: {error}; retrying in 3 s", options.url);
                tokio::time::sleep(Duration::from_secs(3)).await;
                continue;
            }
        };
        while let Some(frame) = stream.next().await {
            let frame = match frame {
                Ok(Message::Text(text)) => text,
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                Err(error) => {
                    eprintln!("stream error: {error}");
                    break;
                }
            };
            if options.json {
                println!("{frame}");
                continue;
            }
            let value: Value = serde_json::from_str(&frame).context("a frame that is not JSON")?;
            if let Some(line) = format_line(&value, options.updates) {
                println!("{line}");
                if value["type"] == "alarm" {
                    printed += 1;
                    if options.count > 0 && printed >= options.count {
                        return Ok(());
                    }
                }
            }
        }
        eprintln!("stream closed; reconnecting in 3 s");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn urls_and_lines() {
        assert_eq!(stream_url("http://h:8080/", "t"), "ws://h:8080/ws?token=t");
        assert_eq!(stream_url("https://h", "t"), "wss://h/ws?token=t");
        let frame = json!({"type": "alarm", "event": "escalated", "alarm": {
            "lastSeen": "2026-01-01T00:00:00Z", "severity": "major", "status": "ACTIVE_UNACK",
            "deviceId": "d1", "ruleName": "Hot", "count": 2, "value": 31.0, "escalationStep": 1, "id": "a"}});
        let line = format_line(&frame, false).unwrap();
        assert!(
            line.contains("ESCALATED") && line.contains("d1") && line.contains("step=1"),
            "{line}"
        );
        let update = json!({"type": "alarm", "event": "updated", "alarm": {}});
        assert!(format_line(&update, false).is_none());
        assert!(format_line(&update, true).is_some());
    }
}
