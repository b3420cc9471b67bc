//! `ActivityRanker`: which devices of a tenant sent the most telemetry lately, for the
//! console's overview ("busiest devices", `GET /stats/busiest-devices`).
//!
//! Nothing is added to the ingestion path: device actors already count the telemetry messages
//! they take in, and the ranker asks them (one small message per running device actor) only
//! when somebody asks for the ranking, at most once per [`MIN_SAMPLE_INTERVAL`] per tenant. A
//! rate is the difference between two samples over the time between them; without a recent
//! sample the first request takes two, [`FIRST_WINDOW`] apart.
//!
//! Samples are per node, like the device actors they read: in a cluster each node ranks the
//! devices it owns, and a fleet-wide ranking is the merge of the nodes' answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use drover_actors::tenant_supervisor::ActivitySample;
use drover_actors::{DeviceId, Fleet, TenantId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A ranking younger than this is answered again rather than sampled anew.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// A previous sample older than this is too old to rank against.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
/// The window of a ranking that had no recent sample to start from.
pub const FIRST_WINDOW: Duration = Duration::from_secs(1);
/// Most devices one ranking lists.
pub const MAX_RANKED: usize = 100;

/// The busiest devices of a tenant over the last window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BusiestDevices {
    /// When the later of the two samples was taken.
    pub sampled_at: DateTime<Utc>,
    /// Seconds between the two samples the rates come from.
    pub window_seconds: f64,
    /// Device actors running (devices connected or recently active) when sampled.
    pub running: usize,
    /// Most active first; devices that sent nothing in the window are left out.
    pub devices: Vec<DeviceActivity>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceActivity {
    pub device_id: String,
    /// Telemetry messages per second over the window (a batch counts once).
    pub messages_per_second: f64,
    /// Telemetry messages in the window.
    pub messages: u64,
}

struct Sample {
    at: Instant,
    counts: HashMap<DeviceId, (u64, u64)>,
    /// The ranking computed when this sample was taken (all devices, most active first).
    ranking: Option<BusiestDevices>,
}

impl Sample {
    fn of(sample: ActivitySample) -> Sample {
        Sample {
            at: Instant::now(),
            counts: sample
                .devices
                .into_iter()
                .map(|(device, generation, count)| (device, (generation, count)))
                .collect(),
            ranking: None,
        }
    }
}

/// Per tenant, the latest sample; a tenant's requests take turns, so a burst of them costs one
/// sampling, not one each.
#[derive(Default)]
pub struct ActivityRanker {
    samples: Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<Option<Sample>>>>>,
}

impl std::fmt::Debug for ActivityRanker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityRanker").finish_non_exhaustive()
    }
}

impl ActivityRanker {
    /// The `limit` busiest devices of `tenant`.
    pub async fn busiest(&self, fleet: &Fleet, tenant: &TenantId, limit: usize) -> BusiestDevices {
        let limit = limit.clamp(1, MAX_RANKED);
        let slot = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.clone())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        let previous = match slot.take() {
            Some(s) if s.at.elapsed() < MIN_SAMPLE_INTERVAL && s.ranking.is_some() => {
                let ranking = s.ranking.clone();
                *slot = Some(s);
                return truncated(ranking, limit);
            }
            Some(s) if s.at.elapsed() <= MAX_WINDOW => s,
            _ => {
                let first = Sample::of(fleet.sample_activity(tenant).await);
                tokio::time::sleep(FIRST_WINDOW).await;
                first
            }
        };
        let mut latest = Sample::of(fleet.sample_activity(tenant).await);
        let ranking = rank(&previous, &latest);
        latest.ranking = Some(ranking.clone());
        *slot = Some(latest);
        truncated(Some(ranking), limit)
    }
}

fn truncated(ranking: Option<BusiestDevices>, limit: usize) -> BusiestDevices {
    let mut ranking = ranking.unwrap_or_else(|| BusiestDevices {
        sampled_at: Utc::now().trunc_subsecs(3),
        window_seconds: 0.0,
        running: 0,
        devices: Vec::new(),
    });
    ranking.devices.truncate(limit);
    ranking
}

/// Messages per device between two samples. A device actor that restarted (new generation)
/// or started within the window counts from zero.
fn rank(earlier: &Sample, later: &Sample) -> BusiestDevices {
    let window = later.at.duration_since(earlier.at).as_secs_f64().max(0.001);
    let mut devices: Vec<DeviceActivity> = later
        .counts
        .iter()
        .filter_map(|(device, (generation, count))| {
            let before = match earlier.counts.get(device) {
                Some((g, c)) if g == generation && c <= count => *c,
                _ => 0,
            };
            let messages = count - before;
            (messages > 0).then(|| DeviceActivity {
                device_id: device.to_string(),
                messages_per_second: (messages as f64 / window * 100.0).round() / 100.0,
                messages,
            })
        })
        .collect();
    devices.sort_by(|a, b| {
        b.messages
            .cmp(&a.messages)
            .then_with(|| a.device_id.cmp(&b.device_id))
    });
    devices.truncate(MAX_RANKED);
    BusiestDevices {
        sampled_at: Utc::now().trunc_subsecs(3),
        window_seconds: (window * 1000.0).round() / 1000.0,
        running: later.counts.len(),
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, counts: &[(&str, u64, u64)]) -> Sample {
        Sample {
            at,
            counts: counts
                .iter()
                .map(|(d, g, c)| (DeviceId::parse(*d).unwrap(), (*g, *c)))
                .collect(),
            ranking: None,
        }
    }

    #[test]
    fn ranks_by_messages_in_the_window_and_counts_restarted_actors_from_zero() {
        let t0 = Instant::now();
        let earlier = sample(t0, &[("a", 1, 100), ("b", 1, 10), ("c", 1, 50), ("idle", 1, 7)]);
        let later = sample(
            t0 + Duration::from_secs(2),
            // b restarted (generation 2): its 4 messages are all new; d started in the window.
            &[
                ("a", 1, 104),
                ("b", 2, 4),
                ("c", 1, 70),
                ("d", 1, 1),
                ("idle", 1, 7),
            ],
        );
        let ranking = rank(&earlier, &later);
        let order: Vec<(&str, u64)> = ranking
            .devices
            .iter()
            .map(|d| (d.device_id.as_str(), d.messages))
            .collect();
        assert_eq!(order, vec![("c", 20), ("a", 4), ("b", 4), ("d", 1)]);
        assert_eq!(ranking.devices[0].messages_per_second, 10.0);
        assert_eq!(ranking.window_seconds, 2.0);
        assert_eq!(ranking.running, 5);
    }
}
