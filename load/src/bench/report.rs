//! What every benchmark prints: a table for people and one JSON line for machines, also
//! appended to a results file when asked.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// What was measured (`drover`, `mosquitto`, an address).
    pub target: String,
    pub at: String,
    pub parameters: Value,
    pub results: BTreeMap<String, Value>,
    pub machine: Value,
}

impl Report {
    pub fn new(scenario: &str, target: &str, parameters: Value) -> Report {
        Report {
            scenario: scenario.into(),
            target: target.into(),
            at: chrono::Utc::now().to_rfc3339(),
            parameters,
            results: BTreeMap::new(),
            machine: machine(),
        }
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.results.insert(key.into(), value.into());
    }

    pub fn print(&self) {
        println!("{} against {}", self.scenario, self.target);
        for (key, value) in &self.results {
            let shown = match value {
                Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
                other => other.to_string(),
            };
            println!("  {key:<28} {shown}");
        }
        println!("{}", serde_json::to_string(self).unwrap_or_default());
    }

    /// Prints the report and appends its JSON line to `record` when given.
    pub fn finish(&self, record: Option<&Path>) -> anyhow::Result<()> {
        self.print();
        match record {
            Some(file) => self.record(file),
            None => Ok(()),
        }
    }

    /// Appends the JSON line to `file` (created with its directory).
    pub fn record(&self, file: &Path) -> anyhow::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
        writeln!(f, "{}", serde_json::to_string(self)?)?;
        Ok(())
    }
}

/// The machine a result was measured on.
pub fn machine() -> Value {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let memory_kb: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "memory_gib": memory_kb / 1024 / 1024,
        "kernel": read("/proc/sys/kernel/osrelease"),
        "load_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Percentiles of a latency histogram in microseconds, as milliseconds.
pub fn latencies(report: &mut Report, prefix: &str, histogram: &hdrhistogram::Histogram<u64>) {
    if histogram.is_empty() {
        return;
    }
    for (name, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
        report.set(
            &format!("{prefix}_{name}_ms"),
            histogram.value_at_quantile(q) as f64 / 1000.0,
        );
    }
    report.set(&format!("{prefix}_max_ms"), histogram.max() as f64 / 1000.0);
    report.set(&format!("{prefix}_mean_ms"), histogram.mean() / 1000.0);
}

/// CPU time this process has used, user and system, all threads (Linux: `/proc/self/stat`,
/// in clock ticks of 1/100 s); `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Fields 3.. of the file: utime and stime are the 14th and 15th.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn process_cpu_time_is_read_and_grows_with_work() {
        let before = super::process_cpu_seconds().expect("Linux /proc/self/stat");
        let started = Instant::now();
        let mut x = 1u64;
        loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            if super::process_cpu_seconds().unwrap() - before >= 0.05 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no CPU time counted");
        }
    }
}
