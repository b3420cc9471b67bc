//! `drover-load monitor`: connects to Drover's live stream (`/ws`) and prints alarms as they
//! open, escalate, get acknowledged and clear. Reconnects (with a pause) when the stream drops.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
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

/// When the event a frame reports happened, from the alarm's own fields: an acknowledgement or a
/// clear is dated by `ackedAt` or `clearedAt`, not by when the condition was last seen.
/// Escalations carry no time of their own.
fn event_time<'a>(event: &str, alarm: &'a Value) -> Option<&'a str> {
    let field = match event {
        "opened" => "firstSeen",
        "updated" => "lastSeen",
        "acknowledged" => "ackedAt",
        "cleared" => "clearedAt",
        _ => return None,
    };
    alarm[field].as_str()
}

/// One printed line for an alarm frame, or `None` for frames that are not shown. `received`
/// dates the events whose frame carries no time of their own.
pub fn format_line(frame: &Value, updates: bool, received: DateTime<Utc>) -> Option<String> {
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
            let at = event_time(event, a).map_or_else(
                || received.to_rfc3339_opts(SecondsFormat::Millis, true),
                str::to_string,
            );
            let value = a["value"]
                .as_f64()
                .map(|v| format!(" value={v}"))
                .unwrap_or_default();
            Some(format!(
                "{:<25} {:<12} {:<9} {:<14} {:<20} {} count={}{} step={} id={}",
                at,
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
            if let Some(line) = format_line(&value, options.updates, Utc::now()) {
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
        let received = "2026-01-01T00:09:00Z".parse().unwrap();
        let frame = json!({"type": "alarm", "event": "escalated", "alarm": {
            "firstSeen": "2026-01-01T00:00:00Z", "lastSeen": "2026-01-01T00:01:00Z",
            "severity": "major", "status": "ACTIVE_UNACK",
            "deviceId": "d1", "ruleName": "Hot", "count": 2, "value": 31.0, "escalationStep": 1, "id": "a"}});
        let line = format_line(&frame, false, received).unwrap();
        assert!(
            line.contains("ESCALATED") && line.contains("d1") && line.contains("step=1"),
            "{line}"
        );
        assert!(line.starts_with("2026-01-01T00:09:00.000Z"), "{line}");
        let update = json!({"type": "alarm", "event": "updated", "alarm": {}});
        assert!(format_line(&update, false, received).is_none());
        assert!(format_line(&update, true, received).is_some());
    }

    #[test]
    fn each_event_is_dated_by_its_own_time() {
        let alarm = json!({"firstSeen": "T-opened", "lastSeen": "T-seen",
            "ackedAt": "T-acked", "clearedAt": "T-cleared"});
        let received = Utc::now();
        for (event, time) in [
            ("opened", "T-opened"),
            ("updated", "T-seen"),
            ("acknowledged", "T-acked"),
            ("cleared", "T-cleared"),
        ] {
            let frame = json!({"type": "alarm", "event": event, "alarm": alarm});
            let line = format_line(&frame, true, received).unwrap();
            assert!(line.starts_with(time), "{event}: {line}");
        }
    }
}
