//! `drover-load`: fleet simulation and load generation against a running Drover, over the
//! network only, like any other client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(
    name = "drover-load",
    version,
    about = "Device simulator, load generator and benchmarks for Drover"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register N devices through the REST API and write their ids and tokens to a CSV file.
    Provision {
        /// Drover's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "DROVER_URL")]
        url: String,
        /// An API key (or login token) with the operator role.
        #[arg(long, env = "DROVER_API_KEY")]
        api_key: String,
        /// How many devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Device ids are <prefix><number>, e.g. sim-00042.
        #[arg(long, default_value = "sim-")]
        prefix: String,
        #[arg(long = "type", default_value = "environment")]
        device_type: String,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Where to write `device_id,token` lines.
        #[arg(long, default_value = "devices.csv")]
        output: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Provision {
            url,
            api_key,
            devices,
            prefix,
            device_type,
            concurrency,
            output,
        } => {
            provision(
                &url,
                &api_key,
                devices,
                &prefix,
                &device_type,
                concurrency,
                &output,
            )
            .await
        }
    }
}

/// Registers the devices; ids already registered are reported and skipped (their tokens are
/// not recoverable, so they are left out of the file).
async fn provision(
    url: &str,
    api_key: &str,
    devices: u32,
    prefix: &str,
    device_type: &str,
    concurrency: usize,
    output: &PathBuf,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = url.trim_end_matches('/').to_string();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let width = devices.to_string().len().max(5);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(devices as usize);
    for n in 1..=devices {
        let (client, base, key, limit) = (client.clone(), base.clone(), api_key.to_string(), limit.clone());
        let id = format!("{prefix}{n:0width$}");
        let body = json!({
            "deviceId": id,
            "type": device_type,
            "metadata": {"simulated": true, "site": format!("site-{}", n % 10)},
            "tags": ["simulated"],
        });
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.expect("semaphore open");
            let response = client
                .post(format!("{base}/api/devices/register"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let value: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::Ok((id, status, value))
        }));
    }
    let mut lines = String::from("device_id,token\n");
    let (mut created, mut existing) = (0u32, 0u32);
    for task in tasks {
        let (id, status, value) = task.await??;
        match status.as_u16() {
            201 => {
                let token = value["token"].as_str().context("no token in the answer")?;
                lines.push_str(&format!("{id},{token}\n"));
                created += 1;
            }
            409 if value["error"]["code"] == "already_exists" => existing += 1,
            _ => bail!("registering {id} failed with {status}: {value}"),
        }
    }
    std::fs::write(output, lines).with_context(|| format!("writing {}", output.display()))?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "registered {created} devices ({existing} already existed) in {elapsed:.2} s ({:.0}/s); tokens in {}",
        f64::from(created) / elapsed.max(1e-9),
        output.display()
    );
    Ok(())
}
