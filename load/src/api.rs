//! The REST calls the load tools make: logins, device provisioning, figures.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// A registered device and the token it logs in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    pub id: String,
    pub token: String,
}

#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    pub fn new(base: &str, key: &str) -> Api {
        Api {
            client: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        }
    }

    /// The API key or login token the calls carry.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The server's base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// POSTs `body`; the status and the answer (not an error when the status is).
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// PUTs `body`; the status and the answer (not an error when the status is).
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let response = self
            .client
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// One sample of `/metrics`, e.g. `process_resident_memory_bytes`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} not in /metrics"))
    }

    /// Registers `count` devices named `<prefix><n>`; ids that exist already are skipped.
    pub async fn register_devices(
        &self,
        prefix: &str,
        count: u32,
        device_type: &str,
        concurrency: usize,
    ) -> anyhow::Result<(Vec<DeviceCredentials>, u32)> {
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let width = count.to_string().len().max(5);
        let mut tasks = Vec::with_capacity(count as usize);
        for n in 1..=count {
            let (api, limit) = (self.clone(), limit.clone());
            let id = format!("{prefix}{n:0width$}");
            let body = json!({
                "deviceId": id,
                "type": device_type,
                "metadata": {"simulated": true, "site": format!("site-{}", n % 10)},
                "tags": ["simulated"],
            });
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.expect("semaphore open");
                let response = api
                    .client
                    .post(format!("{}/api/devices/register", api.base))
                    .bearer_auth(&api.key)
                    .json(&body)
                    .send()
                    .await?;
                let status = response.status();
                let value: Value = response.json().await.unwrap_or(Value::Null);
                anyhow::Ok((id, status, value))
            }));
        }
        let mut created = Vec::new();
        let mut existing = 0;
        for task in tasks {
            let (id, status, value) = task.await??;
            match status.as_u16() {
                201 => created.push(DeviceCredentials {
                    id,
                    token: value["token"]
                        .as_str()
                        .context("no token in the answer")?
                        .to_string(),
                }),
                409 if value["error"]["code"] == "already_exists" => existing += 1,
                _ => bail!("registering {id} failed with {status}: {value}"),
            }
        }
        Ok((created, existing))
    }

    /// A device named `id` with a token: registered when missing, else its token is rotated.
    pub async fn device_credentials(&self, id: &str) -> anyhow::Result<DeviceCredentials> {
        let response = self
            .client
            .post(format!("{}/api/devices/register", self.base))
            .bearer_auth(&self.key)
            .json(&json!({"deviceId": id, "type": "benchmark"}))
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        let token = match status.as_u16() {
            201 => value["token"]
                .as_str()
                .context("no token in the answer")?
                .to_string(),
            409 => self.rotate_token(id).await?,
            _ => bail!("registering {id} failed with {status}: {value}"),
        };
        Ok(DeviceCredentials {
            id: id.to_string(),
            token,
        })
    }

    /// A new token for an existing device (the old one stops working).
    pub async fn rotate_token(&self, id: &str) -> anyhow::Result<String> {
        let response = self
            .client
            .post(format!("{}/api/devices/{id}/token", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            bail!("rotating the token of {id}: {status} {value}");
        }
        Ok(value["token"].as_str().context("no token")?.to_string())
    }
}

/// Reads `device_id,token` lines written by [`write_credentials`].
pub fn read_credentials(path: &Path) -> anyhow::Result<Vec<DeviceCredentials>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(id, token)| DeviceCredentials {
            id: id.to_string(),
            token: token.to_string(),
        })
        .collect())
}

pub fn write_credentials(path: &Path, devices: &[DeviceCredentials]) -> anyhow::Result<()> {
    let mut text = String::from("device_id,token\n");
    for d in devices {
        text.push_str(&format!("{},{}\n", d.id, d.token));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The credentials file after a run: every row it had, with the tokens of `fleet` replacing
/// those of the same ids, then the ids it did not have yet, in `fleet`'s order. Rows of devices
/// outside this run (a larger earlier run, another prefix) are kept: their tokens are the only
/// copy.
pub fn merge_credentials(known: &[DeviceCredentials], fleet: &[DeviceCredentials]) -> Vec<DeviceCredentials> {
    let current: HashMap<&str, &DeviceCredentials> = fleet.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut merged: Vec<DeviceCredentials> = known
        .iter()
        .map(|d| (*current.get(d.id.as_str()).unwrap_or(&d)).clone())
        .collect();
    let had: std::collections::HashSet<&str> = known.iter().map(|d| d.id.as_str()).collect();
    merged.extend(fleet.iter().filter(|d| !had.contains(d.id.as_str())).cloned());
    merged
}

/// Devices `<prefix>00001…` ready to connect: tokens from `file` when it has them, new
/// registrations for the rest, and new tokens for ids registered before without a file entry
/// (the server keeps only digests, so rotating is the only way to get one; the summary says
/// how many). `file` keeps every row it had.
pub async fn fleet(
    api: &Api,
    prefix: &str,
    count: u32,
    device_type: &str,
    file: &Path,
) -> anyhow::Result<Vec<DeviceCredentials>> {
    let started = Instant::now();
    let known = if file.exists() {
        read_credentials(file)?
    } else {
        Vec::new()
    };
    let tokens: HashMap<&str, &str> = known.iter().map(|d| (d.id.as_str(), d.token.as_str())).collect();
    let (created, _) = api.register_devices(prefix, count, device_type, 32).await?;
    let created: HashMap<String, String> = created.into_iter().map(|d| (d.id, d.token)).collect();
    let width = count.to_string().len().max(5);
    let mut devices = Vec::with_capacity(count as usize);
    let mut rotated = 0;
    for n in 1..=count {
        let id = format!("{prefix}{n:0width$}");
        // Registered now (a new id, or a file older than the server's registry): the new token.
        let token = match created
            .get(&id)
            .map(String::as_str)
            .or(tokens.get(id.as_str()).copied())
        {
            Some(t) => t.to_string(),
            None => {
                rotated += 1;
                api.rotate_token(&id).await?
            }
        };
        devices.push(DeviceCredentials { id, token });
    }
    write_credentials(file, &merge_credentials(&known, &devices))?;
    let rotated = if rotated > 0 {
        format!(
            ", {rotated} registered before without a token in {} got new tokens (their old ones no longer work)",
            file.display()
        )
    } else {
        String::new()
    };
    eprintln!(
        "{} devices ready in {:.1} s ({} new{rotated}); tokens in {}",
        devices.len(),
        started.elapsed().as_secs_f64(),
        created.len(),
        file.display()
    );
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, token: &str) -> DeviceCredentials {
        DeviceCredentials {
            id: id.into(),
            token: token.into(),
        }
    }

    #[test]
    fn merging_keeps_rows_outside_the_run_and_replaces_tokens_inside_it() {
        let known = [row("sim-1", "a"), row("sim-2", "b"), row("sim-3", "c")];
        // A smaller run drops nothing.
        assert_eq!(merge_credentials(&known, &known[..1]), known);
        // New tokens replace old ones in place; new ids come after.
        let run = [row("sim-2", "B"), row("sim-4", "d")];
        assert_eq!(
            merge_credentials(&known, &run),
            [
                row("sim-1", "a"),
                row("sim-2", "B"),
                row("sim-3", "c"),
                row("sim-4", "d")
            ]
        );
        assert_eq!(merge_credentials(&[], &run), run);
    }
}
