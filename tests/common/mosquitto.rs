//! Driving Debian's mosquitto clients from tests: argument lists, `mosquitto_pub`, and the
//! output of a long-running `mosquitto_sub` as lines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::sync::mpsc;

use super::tool_available;

/// Whether mosquitto_pub/mosquitto_sub are installed (a notice, or a failure when services
/// are required, when they are not).
pub fn mosquitto() -> bool {
    tool_available("mosquitto_sub", "apt-get install mosquitto-clients")
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub fn with(base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.into_iter()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

/// Runs mosquitto_pub; returns (exit code, everything it printed).
pub fn publish(port: &str, args: &[String]) -> (i32, String) {
    let output = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-d"])
        .args(args)
        .output()
        .expect("mosquitto_pub runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// The child's standard output and error as lines (error lines prefixed `stderr: `).
pub fn spawn_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {line}"));
        }
    });
    rx
}
