//! `drover-load`: fleet simulation, load generation and benchmarks against a running Drover
//! (or, for the broker benchmarks, any MQTT broker), over the network only, like any client.

mod api;
mod bench;
mod monitor;
mod sensors;
mod sim_commands;
mod sim_ota;
mod simulate;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::Api;
use crate::bench::connect::ConnectOptions;
use crate::bench::fanout::FanoutOptions;
use crate::simulate::SimulateOptions;

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

/// Where the Drover server is and how to call its API.
#[derive(Args, Clone)]
struct Server {
    /// Drover's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "DROVER_URL")]
    url: String,
    /// An API key (or login token) with the operator role.
    #[arg(long, env = "DROVER_API_KEY")]
    api_key: String,
    /// Drover's MQTT host.
    #[arg(long, default_value = "127.0.0.1", env = "DROVER_MQTT_HOST")]
    mqtt_host: String,
    /// Drover's MQTT port.
    #[arg(long, default_value_t = 1883, env = "MQTT_PORT")]
    mqtt_port: u16,
    /// MQTT ports of several nodes of a Drover cluster (comma-separated): the devices are
    /// spread over them in turn, instead of all on `mqtt_port`.
    #[arg(long, value_delimiter = ',')]
    mqtt_ports: Vec<u16>,
}

/// Which simulated devices to use.
#[derive(Args, Clone)]
struct Devices {
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Device ids are <prefix><number>, e.g. sim-00042.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    #[arg(long = "type", default_value = "environment")]
    device_type: String,
    /// `device_id,token` lines: read to reuse devices, written with new ones.
    #[arg(long, default_value = "devices.csv")]
    devices_file: PathBuf,
}

/// The telemetry load of the ingest and rules scenarios.
#[derive(Args, Clone)]
struct IngestLoad {
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Messages per second over all devices (0: as fast as the clients allow).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Metrics per message.
    #[arg(long, default_value_t = 1)]
    metrics: u32,
    /// Unacknowledged QoS 1 publishes per device.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Devices (the first N) a dashboard session watches over `/ws` while the load runs:
    /// reports the publish-to-dashboard latency of their messages (0: no dashboard).
    #[arg(long, default_value_t = 0)]
    watch: u32,
}

impl IngestLoad {
    fn options(&self, server: &Server) -> bench::ingest::IngestOptions {
        self.options_for(&server.mqtt_host, server.mqtt_port, &server.mqtt_ports)
    }

    fn options_for(&self, host: &str, port: u16, ports: &[u16]) -> bench::ingest::IngestOptions {
        bench::ingest::IngestOptions {
            host: host.to_string(),
            port,
            ports: ports.to_vec(),
            qos: self.qos,
            seconds: self.seconds,
            rate: self.rate,
            metrics: self.metrics,
            inflight: self.inflight,
            watch: self.watch,
        }
    }
}

impl Devices {
    /// The devices: read from `devices_file`, registered (and added to it) where missing.
    async fn fleet(&self, api: &Api) -> anyhow::Result<Vec<api::DeviceCredentials>> {
        api::fleet(
            api,
            &self.prefix,
            self.devices,
            &self.device_type,
            &self.devices_file,
        )
        .await
    }
}

/// How simulated devices take OTA jobs.
#[derive(Args, Clone)]
struct OtaArgs {
    /// The firmware version a device reports when its shadow has none.
    #[arg(long, default_value = "1.0.0")]
    firmware: String,
    /// Share of OTA jobs (0-1) whose install fails, the same devices for the same job.
    #[arg(long, default_value_t = 0.0)]
    ota_failure_rate: f64,
    /// Milliseconds an install takes.
    #[arg(long, default_value_t = 500)]
    ota_install_ms: u64,
}

impl OtaArgs {
    fn fleet(&self, api_base: &str) -> std::sync::Arc<sim_ota::OtaFleet> {
        sim_ota::OtaFleet::new(sim_ota::OtaSettings {
            api_base: api_base.trim_end_matches('/').to_string(),
            initial_firmware: self.firmware.clone(),
            failure_rate: self.ota_failure_rate.clamp(0.0, 1.0),
            install_time: Duration::from_millis(self.ota_install_ms),
            trusted_key: None,
            interrupt_download_after: None,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Register devices through the REST API and write their ids and tokens to a CSV file.
    Provision {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
    },
    /// Run a simulated fleet: realistic telemetry, shadow changes applied. Ctrl-C stops it.
    Simulate {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
        /// Telemetry messages per second per device.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Probability per reading that a device develops a fault (spike, stuck sensor, runaway).
        #[arg(long, default_value_t = 0.001)]
        fault_rate: f64,
        /// Connections started per second.
        #[arg(long, default_value_t = 500)]
        connect_rate: u32,
        /// No progress bars (for scripts).
        #[arg(long)]
        quiet: bool,
        /// Connect over TLS (to Drover's `MQTT_TLS_PORT`, given as `--mqtt-port`), trusting
        /// the CA certificates in this PEM file (e.g. `certs/ca.pem` from `drover admin dev-certs`).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Devices speak MQTT 5 (commands answered on their Response Topic with their
        /// Correlation Data) instead of MQTT 3.1.1.
        #[arg(long)]
        mqtt5: bool,
        #[command(flatten)]
        ota: OtaArgs,
    },
    /// Benchmarks; each prints a table and a JSON line.
    #[command(subcommand)]
    Bench(Bench),
    /// Print alarms as they open, escalate, get acknowledged and clear (Drover's live stream).
    Monitor {
        /// Drover's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "DROVER_URL")]
        url: String,
        /// An API key or login token of the tenant to watch.
        #[arg(long, env = "DROVER_API_KEY")]
        api_key: String,
        /// Print the raw JSON frames.
        #[arg(long)]
        json: bool,
        /// Also print updates of active alarms (severity rises).
        #[arg(long)]
        updates: bool,
        /// Exit after this many alarm lines (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Ramp up device connections; connect rate, failures, server memory per connection.
    Connect {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
        /// Connection attempts started per second (0: as fast as possible).
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Connections being set up at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds to hold every connection before measuring memory.
        #[arg(long, default_value_t = 2)]
        hold: u64,
        /// Seconds after the hold over which the server's lowest RSS is taken: the allocator
        /// returns what the connect ramp freed some seconds later (0: the RSS at the hold's end).
        #[arg(long, default_value_t = 20)]
        settle: u64,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Sustained device telemetry over MQTT at QoS 0 or 1: accepted msgs/s, ack latency, and
    /// the count read back from the store.
    Ingest {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
        #[command(flatten)]
        load: IngestLoad,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// The ingest scenario's load against any MQTT broker (Mosquitto), which acknowledges
    /// without storing: the reference `load/compare.sh` sets beside Drover's ingest figures.
    IngestBroker {
        /// The name recorded as the target.
        #[arg(long, default_value = "mosquitto")]
        target: String,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// How many clients.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Client ids are <prefix><number>.
        #[arg(long, default_value = "sim-")]
        prefix: String,
        #[command(flatten)]
        load: IngestLoad,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// The ingest scenario with many active rules in the tenant: ingestion figures plus rule
    /// evaluations/s and events the rule engine dropped.
    Rules {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
        /// Rules to create (named bench-rule-N; existing ones are kept).
        #[arg(long, default_value_t = 1000)]
        rules: u32,
        #[command(flatten)]
        load: IngestLoad,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// The ingest scenario twice, with the tenant's live analytics off and then on: both
    /// throughputs, their ratio, scoring and training costs. With `--rules N`, the second run
    /// also has N rules (the `rules` scenario's mix): the cost of rules and analytics together.
    Analytics {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        devices: Devices,
        /// Rules to create between the two runs (0: analytics alone).
        #[arg(long, default_value_t = 0)]
        rules: u32,
        #[command(flatten)]
        load: IngestLoad,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Aggregated and raw queries over a series of many points, loaded through the ingestion API.
    Query {
        #[command(flatten)]
        server: Server,
        /// Points to load into the benchmark device.
        #[arg(long, default_value_t = 1_000_000)]
        points: u64,
        /// Times each query runs.
        #[arg(long, default_value_t = 10)]
        repeat: u32,
        /// Seconds to wait for rollups to cover the loaded range before timing.
        #[arg(long, default_value_t = 90)]
        wait_rollups: u64,
        /// Loading requests (1,000 points each) in flight at once.
        #[arg(long, default_value_t = 4)]
        load_concurrency: usize,
        /// The device to load (registered if missing; its token is rotated).
        #[arg(long, default_value = "bench-query")]
        device: String,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Publish-to-subscriber throughput and latency through any MQTT broker.
    Fanout {
        /// A name for what is measured (drover, mosquitto…).
        #[arg(long, default_value = "broker")]
        target: String,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// Where the publishers connect, when not to `port` (another node of a Drover
        /// cluster: the subscribers stay on `port`, so every message crosses nodes).
        #[arg(long)]
        publish_port: Option<u16>,
        #[arg(long)]
        username: Option<String>,
        /// Password (for Drover: an API key).
        #[arg(long, env = "BENCH_PASSWORD")]
        password: Option<String>,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long, default_value_t = 1)]
        publishers: u32,
        #[arg(long, default_value_t = 1)]
        subscribers: u32,
        /// Messages per publisher.
        #[arg(long, default_value_t = 100_000)]
        messages: u32,
        /// Payload bytes (at least 16: a timestamp and a sequence number).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Messages per second per publisher (0: as fast as the client allows).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// The broker's policy for a subscriber whose queue is full, recorded with the
        /// results (Drover: the server's `MQTT_SLOW_SUBSCRIBER`, `drop` or `backpressure`).
        #[arg(long)]
        slow_subscriber: Option<String>,
        /// Append the JSON line to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
}

/// Many connections need many file descriptors: raise the soft limit as far as allowed.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: limit.rlim_max.max(1 << 20),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    match Cli::parse().command {
        Command::Monitor {
            url,
            api_key,
            json,
            updates,
            count,
        } => {
            monitor::run(monitor::MonitorOptions {
                url,
                token: api_key,
                json,
                updates,
                count,
            })
            .await?;
        }
        Command::Provision { server, devices } => {
            devices.fleet(&Api::new(&server.url, &server.api_key)).await?;
        }
        Command::Simulate {
            server,
            devices,
            rate,
            qos,
            duration,
            fault_rate,
            connect_rate,
            quiet,
            tls_ca,
            mqtt5,
            ota,
        } => {
            let api = Api::new(&server.url, &server.api_key);
            let fleet = devices.fleet(&api).await?;
            let ota_fleet = ota.fleet(&server.url);
            let options = SimulateOptions {
                host: server.mqtt_host,
                port: server.mqtt_port,
                rate,
                qos,
                duration: duration.map(Duration::from_secs),
                fault_rate,
                connect_rate,
                tls: tls_ca.as_deref().map(simulate::tls_config).transpose()?,
                mqtt5,
                ota: ota_fleet.clone(),
            };
            let summary = simulate::run(fleet, options, quiet).await?;
            let stats = api.get("/stats").await.ok();
            println!(
                "simulated {} devices for {:.1} s: {} connected, {} messages sent ({:.0}/s), {} acknowledged, {} shadow updates applied, {} commands answered, {} errors",
                summary.devices,
                summary.seconds,
                summary.connected,
                summary.messages_sent,
                summary.messages_per_second,
                summary.messages_acked,
                summary.shadow_updates_applied,
                summary.commands_answered,
                summary.errors
            );
            let jobs = &ota_fleet.counters;
            println!(
                "OTA jobs: {} taken, {} succeeded, {} failed, {} downloads resumed",
                jobs.jobs.load(std::sync::atomic::Ordering::Relaxed),
                jobs.succeeded.load(std::sync::atomic::Ordering::Relaxed),
                jobs.failed.load(std::sync::atomic::Ordering::Relaxed),
                jobs.resumed.load(std::sync::atomic::Ordering::Relaxed),
            );
            if let Some(stats) = stats {
                println!(
                    "server /stats: devices {}, telemetry {}",
                    stats["devices"], stats["telemetry"]
                );
            }
            println!("{}", serde_json::to_string(&summary)?);
        }
        Command::Bench(Bench::Connect {
            server,
            devices,
            rate,
            concurrency,
            hold,
            settle,
            record,
        }) => {
            let api = Api::new(&server.url, &server.api_key);
            let fleet = devices.fleet(&api).await?;
            let report = bench::connect::run(
                &api,
                fleet,
                ConnectOptions {
                    host: server.mqtt_host,
                    port: server.mqtt_port,
                    rate,
                    hold,
                    settle,
                    concurrency,
                },
            )
            .await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::Ingest {
            server,
            devices,
            load,
            record,
        }) => {
            let api = Api::new(&server.url, &server.api_key);
            let fleet = devices.fleet(&api).await?;
            let report = bench::ingest::run(&api, fleet, load.options(&server)).await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::IngestBroker {
            target,
            host,
            port,
            devices,
            prefix,
            load,
            record,
        }) => {
            let report =
                bench::ingest::run_broker(&target, devices, &prefix, load.options_for(&host, port, &[]))
                    .await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::Rules {
            server,
            devices,
            rules,
            load,
            record,
        }) => {
            let api = Api::new(&server.url, &server.api_key);
            let fleet = devices.fleet(&api).await?;
            let report = bench::rules::run(&api, fleet, rules, load.options(&server)).await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::Analytics {
            server,
            devices,
            rules,
            load,
            record,
        }) => {
            let api = Api::new(&server.url, &server.api_key);
            let fleet = devices.fleet(&api).await?;
            let report = bench::analytics::run(&api, fleet, rules, || load.options(&server)).await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::Query {
            server,
            points,
            repeat,
            wait_rollups,
            load_concurrency,
            device,
            record,
        }) => {
            let api = Api::new(&server.url, &server.api_key);
            let credentials = api.device_credentials(&device).await?;
            let report = bench::query::run(
                &api,
                credentials,
                bench::query::QueryOptions {
                    points,
                    repeat,
                    wait_rollups,
                    load_concurrency,
                },
            )
            .await?;
            report.finish(record.as_deref())?;
        }
        Command::Bench(Bench::Fanout {
            target,
            host,
            port,
            publish_port,
            username,
            password,
            qos,
            publishers,
            subscribers,
            messages,
            payload,
            rate,
            slow_subscriber,
            record,
        }) => {
            let report = bench::fanout::run(FanoutOptions {
                target,
                host,
                port,
                publish_port,
                username,
                password,
                qos,
                publishers,
                subscribers,
                messages,
                payload,
                rate,
                slow_subscriber,
            })
            .await?;
            report.finish(record.as_deref())?;
        }
    }
    Ok(())
}
