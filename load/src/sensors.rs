//! Realistic device readings: daily cycles, slow drift, noise, and faults injected on purpose
//! (spikes, stuck sensors, drift runaway) so that rules and anomaly detection have something real
//! to find.

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{Map, Value, json};

/// A fault currently affecting a simulated device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Temperature jumps by this many degrees for one reading.
    Spike(f64),
    /// The sensor repeats its last reading for this many more readings.
    Stuck(u32),
    /// Temperature drifts upwards by this much per reading (an overheating motor).
    Runaway(f64),
}

#[derive(Debug, Clone)]
pub struct SensorModel {
    /// Baseline temperature (°C) and daily swing.
    base_temperature: f64,
    swing: f64,
    /// Slow sensor drift, °C per hour.
    drift_per_hour: f64,
    humidity_base: f64,
    battery: f64,
    vibration_base: f64,
    fault: Option<Fault>,
    last: Option<Map<String, Value>>,
    runaway: f64,
    /// Probability per reading that a fault starts.
    pub fault_rate: f64,
}

impl SensorModel {
    pub fn new(rng: &mut impl Rng, fault_rate: f64) -> SensorModel {
        SensorModel {
            base_temperature: rng.gen_range(18.0..24.0),
            swing: rng.gen_range(2.0..6.0),
            drift_per_hour: rng.gen_range(-0.05..0.05),
            humidity_base: rng.gen_range(40.0..65.0),
            battery: rng.gen_range(80.0..100.0),
            vibration_base: rng.gen_range(0.1..0.6),
            fault: None,
            last: None,
            runaway: 0.0,
            fault_rate,
        }
    }

    /// The reading at `timestamp_ms`, `elapsed_hours` after the simulation started.
    pub fn reading(
        &mut self,
        rng: &mut impl Rng,
        timestamp_ms: i64,
        elapsed_hours: f64,
    ) -> Map<String, Value> {
        if self.fault.is_none() && rng.gen_bool(self.fault_rate.clamp(0.0, 1.0)) {
            self.fault = Some(match rng.gen_range(0..3) {
                0 => Fault::Spike(rng.gen_range(15.0..40.0)),
                1 => Fault::Stuck(rng.gen_range(5..30)),
                _ => Fault::Runaway(rng.gen_range(0.2..1.0)),
            });
        }
        if let (Some(Fault::Stuck(left)), Some(last)) = (self.fault, self.last.clone()) {
            self.fault = (left > 1).then_some(Fault::Stuck(left - 1));
            return last;
        }
        let noise = Normal::new(0.0, 0.3).expect("valid distribution");
        let hour_of_day = ((timestamp_ms / 1000) % 86_400) as f64 / 3600.0;
        // Warmest mid-afternoon, coolest before dawn.
        let daily = self.swing * ((hour_of_day - 9.0) / 24.0 * std::f64::consts::TAU).sin();
        let mut temperature =
            self.base_temperature + daily + self.drift_per_hour * elapsed_hours + noise.sample(rng);
        match self.fault {
            Some(Fault::Spike(delta)) => {
                temperature += delta;
                self.fault = None;
            }
            Some(Fault::Runaway(step)) => {
                self.runaway += step;
                temperature += self.runaway;
                if self.runaway > 30.0 {
                    self.fault = None;
                    self.runaway = 0.0;
                }
            }
            _ => {}
        }
        let humidity = (self.humidity_base - 1.5 * daily + Normal::new(0.0, 1.0).expect("valid").sample(rng))
            .clamp(0.0, 100.0);
        let vibration =
            (self.vibration_base + self.runaway * 0.05 + Normal::new(0.0, 0.05).expect("valid").sample(rng))
                .max(0.0);
        self.battery = (self.battery - rng.gen_range(0.0..0.002)).max(0.0);
        let reading: Map<String, Value> = [
            ("temperature", json!(round2(temperature))),
            ("humidity", json!(round2(humidity))),
            ("vibration", json!(round2(vibration * 1000.0) / 1000.0)),
            ("battery", json!(round2(self.battery))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.last = Some(reading.clone());
        reading
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The telemetry message of one reading, in the platform's format.
pub fn message(timestamp_ms: i64, metrics: Map<String, Value>) -> Value {
    json!({"timestamp": timestamp_ms, "metrics": metrics})
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn readings_are_plausible_and_follow_the_day() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut model = SensorModel::new(&mut rng, 0.0);
        let day = 86_400_000i64;
        let afternoon = model.reading(&mut rng, day + 15 * 3_600_000, 0.0)["temperature"]
            .as_f64()
            .unwrap();
        let dawn = model.reading(&mut rng, day + 3 * 3_600_000, 0.0)["temperature"]
            .as_f64()
            .unwrap();
        assert!(afternoon > dawn, "{afternoon} vs {dawn}");
        let r = model.reading(&mut rng, day, 0.0);
        assert!((0.0..=100.0).contains(&r["humidity"].as_f64().unwrap()));
        assert!(r["battery"].as_f64().unwrap() <= 100.0);
    }

    #[test]
    fn faults_show_in_the_readings() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut model = SensorModel::new(&mut rng, 0.0);
        let normal = model.reading(&mut rng, 0, 0.0)["temperature"].as_f64().unwrap();
        model.fault = Some(Fault::Spike(30.0));
        let spiked = model.reading(&mut rng, 0, 0.0)["temperature"].as_f64().unwrap();
        assert!(spiked > normal + 20.0);
        assert_eq!(model.fault, None, "a spike lasts one reading");
        model.fault = Some(Fault::Stuck(3));
        let stuck: Vec<Value> = (0..3)
            .map(|_| model.reading(&mut rng, 0, 0.0)["temperature"].clone())
            .collect();
        assert!(stuck.windows(2).all(|w| w[0] == w[1]));
    }
}
