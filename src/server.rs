//! Starting and stopping the platform: registry, actor tree, HTTP server.
//!
//! `start` runs inside an actix system and returns once everything listens; `shutdown` is the
//! reverse, in order: stop accepting and let in-flight requests finish, stop the actors, write
//! what the audit queue still holds.

use crate::analytics::engine::AnalyticsEngine;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::{HttpServer, web};
use drover_actors::clock::{SharedClock, SystemClock};
use drover_actors::downsampler::{Downsampler, StopDownsampler};
use drover_actors::pipeline::Pipeline;
use drover_actors::telemetry_writer::{SpoolReplayer, StopReplayer, WriterPool, WriterSettings};
use drover_actors::tenant_supervisor::SupervisorSettings;
use drover_actors::{Fleet, ShadowLimits, ShadowServices, ShadowStore};

use crate::audit::{AuditRetention, AuditSink, AuditWriter};
use crate::auth::LoginThrottle;
use crate::auth::throttle::ThrottleLimits;
use crate::bootstrap::{self, BootstrapError, FirstStart};
use crate::config::{Config, ConfigError};
use crate::dashboard::DashboardHub;
use crate::health::HealthChecker;
use crate::http;
use crate::metrics::{Metrics, ShadowUpdateCounter};
use crate::mqtt::auth::Authenticator;
use crate::mqtt::broker::{Broker, BrokerLimits};
use crate::mqtt::connection::MqttContext;
use crate::mqtt::listener::{self, ListenError, MqttListener};
use crate::mqtt::metrics::BrokerMetrics;
use crate::mqtt::outbound::BrokerOutbound;
use crate::presence::{PresenceRecorder, PresenceWriter};
use crate::rules::shadow_patch::FleetShadowPatcher;
use crate::rules::{RulesDeps, RulesEngine};
use crate::state::AppState;
use crate::storage::shadows::CachedShadowStore;
use crate::storage::{Database, RegistryStore, StoreError};
use crate::telemetry::{self, TelemetryOpenError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {path} (DATA_DIR): {error}")]
    DataDir { path: String, error: std::io::Error },
    #[error("registry database: {0}")]
    Registry(#[from] StoreError),
    #[error("first start: {0}")]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryOpenError),
    #[error("cannot listen for HTTP on {addr} (PORT, HTTP_BIND): {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error(transparent)]
    Mqtt(#[from] ListenError),
    #[error("rules engine: {0}")]
    Rules(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("firmware signing key: {0}")]
    FirmwareKey(#[from] crate::ota::signing::SigningKeyError),
}

/// A started platform.
pub struct RunningServer {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// Set on the very first start: the default tenant and admin that were created.
    pub first_start: Option<FirstStart>,
    pub state: web::Data<AppState>,
    http: actix_web::dev::ServerHandle,
    http_task: actix_rt::task::JoinHandle<std::io::Result<()>>,
    mqtt: MqttListener,
    sweeper: actix_rt::task::JoinHandle<()>,
    presence: PresenceWriter,
    node: String,
    audit: AuditWriter,
    downsampler: Addr<Downsampler>,
    replayer: Addr<SpoolReplayer>,
}

/// Names this server in the registry's presence records: host and MQTT port, so a restart
/// on the same host and port clears what it left behind.
fn node_id(mqtt_port: u16) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "drover".into());
    format!("{host}:{mqtt_port}")
}

/// The process's open-file limits (RLIMIT_NOFILE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Descriptors kept for what is not a device connection: databases, spool, HTTP, logs.
const RESERVED_FILES: u64 = 256;

/// Every MQTT connection holds a file descriptor, and most systems start processes with a soft
/// limit (often 1024) far below the hard limit they allow: raise the soft limit to the hard one.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // An unlimited hard limit still caps the soft one at the kernel's fs.nr_open.
    let ceiling = if limit.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < ceiling {
        let raised = libc::rlimit {
            rlim_cur: ceiling,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = ceiling;
    }
    Ok(OpenFileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// The MQTT connections `limit` leaves room for, when that is fewer than `max_devices`.
fn connection_room_below(limit: OpenFileLimit, max_devices: u64) -> Option<u64> {
    let room = limit.soft.saturating_sub(RESERVED_FILES);
    (room < max_devices).then_some(room)
}

/// Raises the open-file limit and warns, with the numbers, only when it stays too low for
/// `MAX_DEVICES` connections.
fn ensure_open_file_limit(max_devices: u64) {
    match raise_open_file_limit() {
        Ok(limit) => {
            if let Some(room) = connection_room_below(limit, max_devices) {
                tracing::warn!(
                    open_files_soft = limit.soft,
                    open_files_hard = limit.hard,
                    max_devices,
                    "the open-file limit leaves room for about {room} MQTT connections, fewer than \
                     MAX_DEVICES: raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower \
                     MAX_DEVICES"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

/// Opens the registry (creating and migrating it if needed) and applies pending migrations.
pub async fn open_registry(config: &Config) -> Result<RegistryStore, StartError> {
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|error| StartError::DataDir {
        path: data_dir.display().to_string(),
        error,
    })?;
    let target = config.database_target()?;
    let pool_size = config.storage.pool_size;
    let db = tokio::task::spawn_blocking(move || -> Result<Database, StoreError> {
        let db = Database::open(&target, pool_size)?;
        let applied = db.migrate()?;
        if !applied.is_empty() {
            tracing::info!(?applied, "registry migrations applied");
        }
        Ok(db)
    })
    .await
    .map_err(|e| StoreError::Internal(e.to_string()))??;
    tracing::info!(
        backend = db.backend().as_str(),
        database = db.description(),
        "registry ready"
    );
    Ok(RegistryStore::new(db))
}

/// What keeps one registry's cached shadows apart from another's in a shared Redis: the
/// cluster's name, or a digest of where a single node's registry lives.
fn shadow_cache_scope(config: &Config) -> String {
    if config.cluster.enabled() {
        return config.cluster.name.clone();
    }
    use sha2::Digest;
    let place = match config.database_target() {
        Ok(crate::config::DatabaseTarget::Postgres(url)) => url,
        Ok(crate::config::DatabaseTarget::Sqlite(path)) => {
            std::fs::canonicalize(&path).unwrap_or(path).display().to_string()
        }
        Err(_) => String::new(),
    };
    hex::encode(&sha2::Sha256::digest(place.as_bytes())[..6])
}

/// The registry's shadow store, behind a Redis cache when Redis is configured.
fn shadow_store(config: &Config, registry: &RegistryStore) -> Arc<dyn ShadowStore> {
    let database: Arc<dyn ShadowStore> = Arc::new(registry.clone());
    let url = config.redis.url.expose();
    if url.is_empty() {
        return database;
    }
    match redis::Client::open(url) {
        Ok(client) => {
            tracing::info!(redis = %crate::config::mask_url(url), "device shadows cached in Redis");
            Arc::new(CachedShadowStore::new(
                database,
                client,
                &shadow_cache_scope(config),
            ))
        }
        Err(error) => {
            tracing::warn!(%error, "REDIS_URL not usable; device shadows are not cached");
            database
        }
    }
}

/// Starts everything. Must run inside an actix system (`actix_rt::System`).
pub async fn start(config: Config, admin_password: Option<String>) -> Result<RunningServer, StartError> {
    start_with_clock(config, admin_password, Arc::new(SystemClock)).await
}

/// An observer's `missed` callback that counts into one of its own counters, so its figure in
/// `/metrics` covers the events the pipeline could not hand it.
fn counting_into<C: Send + Sync + 'static>(
    counters: Arc<C>,
    counter: fn(&C) -> &std::sync::atomic::AtomicU64,
) -> impl Fn() + Send + Sync + 'static {
    move || {
        counter(&counters).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// As [`start`], with the clock the rules engine reads (windows, timers, escalation): tests pass
/// a `ManualClock` to control time instead of sleeping.
pub async fn start_with_clock(
    config: Config,
    admin_password: Option<String>,
    clock: SharedClock,
) -> Result<RunningServer, StartError> {
    let started = Instant::now();
    ensure_open_file_limit(config.limits.max_devices);
    let config = Arc::new(config);
    let registry = open_registry(&config).await?;
    let first_start = bootstrap::ensure_first_tenant(&registry, admin_password).await?;

    let keys = bootstrap::signing_keys(&config, &registry).await?;
    let jwt = keys.jwt;

    // Bound first, so a port 0 is known (it names this node in presence records).
    let listeners = listener::bind(&config)?;
    let node = if config.cluster.enabled() {
        config.cluster.node_id.clone()
    } else {
        node_id(listeners.addr.port())
    };
    let cleared = registry.clear_presence(&node).await?;
    if cleared > 0 {
        tracing::info!(
            devices = cleared,
            "devices this node had connected before it stopped are offline now"
        );
    }

    let metrics = Arc::new(Metrics::new());
    let (audit, audit_writer) = AuditSink::start(registry.clone(), metrics.audit_dropped.clone());
    let (presence, presence_writer) = PresenceRecorder::start(registry.clone(), node.clone());
    let telemetry = telemetry::open(&config, &metrics).await?;
    let writers = WriterPool::start(
        config.telemetry_writers(),
        telemetry.store.clone(),
        telemetry.spool.clone(),
        WriterSettings {
            batch_size: config.telemetry.batch_size,
            batch_interval: Duration::from_millis(config.telemetry.batch_interval_ms),
            queue_points: config.telemetry.writer_queue_points,
            ..WriterSettings::default()
        },
    );
    telemetry::metrics::register_writers(&metrics, &writers);
    let replayer = SpoolReplayer::new(
        telemetry.store.clone(),
        telemetry.spool.clone(),
        writers.spooling_flag(),
        Duration::from_secs(1),
    )
    .start();
    // Before the actors: device actors publish their shadow replies through it.
    let broker = Arc::new(Broker::new(
        BrokerLimits::from_config(&config.mqtt, config.limits.max_devices),
        BrokerMetrics::new(&metrics),
    ));
    let shadow_patcher = Arc::new(FleetShadowPatcher::default());
    let late_commands = Arc::new(crate::fleet_ops::commands::LateCommands::default());
    let hub = DashboardHub::default();
    // Filled when this node joins its cluster (after it listens), read by the broker's
    // connections and the live stream.
    let cluster_slot: Arc<std::sync::OnceLock<Arc<crate::cluster::Cluster>>> = Arc::default();
    let rules = Arc::new(
        RulesEngine::start(
            &config,
            RulesDeps {
                registry: registry.clone(),
                metrics: metrics.clone(),
                hub: hub.clone(),
                clock,
                patcher: shadow_patcher.clone(),
                secret_key: keys.rules_secret_key.clone(),
                commands: late_commands.clone(),
                spanning: config
                    .cluster
                    .enabled()
                    .then(|| Arc::new(crate::cluster::spanning::SpanningLeases::default())),
            },
        )
        .map_err(StartError::Rules)?,
    );
    let analytics = Arc::new(AnalyticsEngine::start(
        &config,
        registry.clone(),
        hub.clone(),
        writers.clone(),
        &metrics,
        crate::analytics::engine::RulesLink {
            findings: rules.router.clone().recipient(),
            demand: rules.demand.clone(),
            clock: rules.clock.clone(),
        },
    ));
    let pipeline = Arc::new(
        Pipeline::new(config.telemetry.payload_limits())
            .with_writers(writers.clone())
            .with_observer(
                rules.router.clone().recipient(),
                drover_actors::pipeline::router_mailbox(config.rules.mailbox),
                counting_into(rules.counters.clone(), |c| &c.dropped),
            )
            .with_observer(
                analytics.router.clone().recipient(),
                drover_actors::pipeline::router_mailbox(config.rules.mailbox),
                counting_into(analytics.counters.clone(), |c| &c.dropped),
            )
            .with_live(Arc::new(crate::cluster::live::ClusterLive::new(
                hub.clone(),
                cluster_slot.clone(),
            ))),
    );
    let shadow_store = shadow_store(&config, &registry);
    let ota = Arc::new(crate::ota::Ota::start(
        &config,
        registry.clone(),
        Arc::new(BrokerOutbound::new(broker.clone())),
        shadow_store.clone(),
        hub.clone(),
        crate::cluster::leases::Leases::new(config.cluster.enabled(), cluster_slot.clone()),
    )?);
    let settings = SupervisorSettings {
        device_mailbox_capacity: config.actors.device_mailbox,
        pipeline: pipeline.clone(),
        device_idle_timeout: config.device_idle_timeout(),
        shadows: Arc::new(ShadowServices {
            store: shadow_store.clone(),
            outbound: Arc::new(BrokerOutbound::new(broker.clone())),
            metrics: Arc::new(ShadowUpdateCounter(metrics.shadow_updates.clone())),
            limits: ShadowLimits::default(),
            shared_store: config.cluster.enabled(),
        }),
        jobs: ota.device_jobs(),
        ..SupervisorSettings::default()
    };
    let fleet = Fleet::start(
        Arc::new(registry.clone()),
        presence,
        settings,
        config.actor_threads(),
    );
    shadow_patcher.attach(fleet.clone());
    let fleet_ops = {
        use crate::fleet_ops::{FleetOps, commands::CommandService, jobs::OperationContext};
        let commands = CommandService::new(registry.clone(), fleet.clone());
        late_commands.attach(commands.clone());
        let context = OperationContext {
            registry: registry.clone(),
            fleet: fleet.clone(),
            broker: broker.clone(),
            shadows: shadow_store.clone(),
            commands,
        };
        let lease: Arc<dyn drover_actors::job_actor::JobLease> = if config.cluster.enabled() {
            Arc::new(crate::cluster::leases::ClusterJobLease::new(
                crate::cluster::leases::Leases::new(true, cluster_slot.clone()),
            ))
        } else {
            Arc::new(drover_actors::job_actor::LocalLease)
        };
        Arc::new(FleetOps::start(context, &keys.rules_secret_key, lease))
    };
    let auth = Authenticator::new(registry.clone(), config.mqtt.allow_anonymous);
    auth.reload_cas().await?;
    let mqtt = Arc::new(MqttContext {
        broker: broker.clone(),
        auth,
        registry: registry.clone(),
        fleet: fleet.clone(),
        audit: audit.clone(),
        config: config.mqtt.clone(),
        cluster: cluster_slot.clone(),
    });
    let downsampler = Downsampler::new(
        telemetry.store.clone(),
        Duration::from_secs(config.telemetry.maintenance_interval_secs),
    )
    .with_housekeeping(Arc::new(AuditRetention::new(
        registry.clone(),
        config.storage.audit_retention_days,
    )))
    .start();

    let state = web::Data::new(AppState {
        health: HealthChecker::new(&config, registry.clone())
            .with_telemetry(telemetry.store.clone(), telemetry.spool.clone()),
        login_throttle: LoginThrottle::new(ThrottleLimits {
            max_failures: config.auth.max_failed_logins,
            max_failures_per_source: config.auth.max_failed_logins_per_source,
            lockout: Duration::from_secs(config.auth.login_lockout_secs),
            max_entries: config.auth.login_throttle_entries,
        }),
        config: config.clone(),
        registry,
        fleet,
        jwt,
        audit,
        metrics,
        mqtt: mqtt.clone(),
        started,
        telemetry: telemetry.store,
        telemetry_spool: telemetry.spool,
        writers,
        pipeline,
        shadow_store,
        rules,
        hub,
        downsampler: downsampler.clone(),
        replayer: replayer.clone(),
        analytics,
        fleet_ops,
        ota,
    });

    // Batch jobs' update_firmware starts OTA campaigns.
    state
        .fleet_ops
        .jobs
        .attach_campaigns(Arc::new(crate::ota::launcher::OtaLauncher::new(
            &state.clone().into_inner(),
        )));

    let addr = format!("{}:{}", config.http.bind, config.http.port);
    let app_state = state.clone();
    let server = HttpServer::new(move || http::app(app_state.clone()))
        .workers(config.http_workers())
        .disable_signals()
        // Live frames (/ws) are small and frequent: Nagle's algorithm would hold each one
        // until the previous is acknowledged (up to the client's 40 ms delayed ACK).
        .tcp_nodelay(true)
        .shutdown_timeout(config.http.shutdown_timeout_secs)
        .bind((config.http.bind.as_str(), config.http.port))
        .map_err(|error| StartError::Bind {
            addr: addr.clone(),
            error,
        })?;
    let http_addr = *server.addrs().first().ok_or_else(|| StartError::Bind {
        addr: addr.clone(),
        error: std::io::Error::other("no address bound"),
    })?;
    let server = server.run();
    let handle = server.handle();
    let http_task = actix_rt::spawn(server);

    // A cluster node joins before it takes connections: devices claim their ownership.
    if config.cluster.enabled() {
        let cluster = crate::cluster::Cluster::join(
            &config.cluster,
            config.redis.url.expose(),
            http_addr,
            listeners.addr,
            &state.metrics,
            &mqtt,
            &state.hub,
        )
        .await?;
        let (rules, fleet) = (state.rules.clone(), state.fleet.clone());
        cluster.set_notice_hook(Box::new(move |notice| {
            use crate::cluster::notices::Notice;
            let tenant_of = |t: &str| drover_actors::TenantId::parse(t).ok();
            match notice {
                Notice::Rules { tenant } => {
                    if let Some(t) = tenant_of(tenant) {
                        rules.reload(&t);
                    }
                }
                Notice::AlarmClosed {
                    tenant,
                    rule_id,
                    device,
                } => {
                    if let Some(t) = tenant_of(tenant) {
                        rules.alarm_closed(&t, rule_id, device);
                    }
                }
                Notice::DeviceType { tenant, device_type } => {
                    if let Some(t) = tenant_of(tenant) {
                        fleet.device_type_changed(&t, device_type);
                    }
                }
                _ => {}
            }
        }));
        if let Some(spanning) = &state.rules.spanning {
            spanning.start(&cluster);
        }
        let _ = cluster_slot.set(cluster);
    }
    let mqtt_listener = listener::serve(listeners, mqtt, &config)?;
    let sweeper = actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            broker.sweep(Instant::now());
        }
    });
    tracing::info!(
        %http_addr,
        mqtt_addr = %mqtt_listener.addr,
        mqtt_tls_addr = ?mqtt_listener.tls_addr,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "listening"
    );

    Ok(RunningServer {
        http_addr,
        mqtt_addr: mqtt_listener.addr,
        mqtt_tls_addr: mqtt_listener.tls_addr,
        first_start,
        state,
        http: handle,
        http_task,
        mqtt: mqtt_listener,
        sweeper,
        presence: presence_writer,
        node,
        audit: audit_writer,
        downsampler,
        replayer,
    })
}

impl RunningServer {
    /// Graceful stop: in-flight requests finish (up to `http.shutdown_timeout_secs`), actors
    /// stop, queued audit records are written.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: MQTT");
        self.mqtt.stop().await;
        if let Some(cluster) = self.state.mqtt.cluster.get() {
            cluster.leave().await;
        }
        self.sweeper.abort();
        tracing::info!("shutting down: HTTP");
        self.http.stop(true).await;
        let _ = self.http_task.await;
        tracing::info!("shutting down: actors");
        self.state.ota.stop();
        let fleet = self.state.fleet.clone();
        let _ = tokio::task::spawn_blocking(move || fleet.shutdown()).await;
        tracing::info!("shutting down: telemetry writers");
        self.state.writers.drain(Duration::from_secs(10)).await;
        self.replayer.do_send(StopReplayer {});
        self.state.analytics.shutdown().await;
        self.state.rules.shutdown().await;
        let _ = self.downsampler.send(StopDownsampler {}).await;
        self.presence.finish(Duration::from_secs(5)).await;
        if let Err(error) = self.state.registry.clear_presence(&self.node).await {
            tracing::warn!(%error, "could not mark this node's devices offline");
        }
        self.audit.finish(Duration::from_secs(5)).await;
        tracing::info!("stopped");
    }
}

/// A server running in its own thread with its own actix system, for embedding Drover in
/// another program (and for tests). Dropping it shuts the server down gracefully.
pub struct ServerThread {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    pub mqtt_tls_addr: Option<SocketAddr>,
    pub first_start: Option<FirstStart>,
    pub state: web::Data<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Starts the server and returns once it listens (or failed to start).
    pub fn spawn(config: Config, admin_password: Option<String>) -> Result<ServerThread, StartError> {
        Self::spawn_with_clock(config, admin_password, Arc::new(SystemClock))
    }

    /// As [`ServerThread::spawn`], with the rules engine's clock (see [`start_with_clock`]).
    pub fn spawn_with_clock(
        config: Config,
        admin_password: Option<String>,
        clock: SharedClock,
    ) -> Result<ServerThread, StartError> {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("drover-server".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    match start_with_clock(config, admin_password, clock).await {
                        Ok(running) => {
                            let ready = (
                                (running.http_addr, running.mqtt_addr, running.mqtt_tls_addr),
                                running.first_start.clone(),
                                running.state.clone(),
                            );
                            let _ = started_tx.send(Ok(ready));
                            let _ = stop_rx.await;
                            running.shutdown().await;
                        }
                        Err(error) => {
                            let _ = started_tx.send(Err(error));
                        }
                    }
                })
            })
            .map_err(|error| StartError::Bind {
                addr: "server thread".into(),
                error,
            })?;
        let ((http_addr, mqtt_addr, mqtt_tls_addr), first_start, state) =
            started_rx.recv().map_err(|_| {
                StartError::Registry(StoreError::Internal("server thread ended during start".into()))
            })??;
        Ok(ServerThread {
            http_addr,
            mqtt_addr,
            mqtt_tls_addr,
            first_start,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops the server gracefully and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_short_only_below_max_devices_plus_the_reserve() {
        let limit = |soft| OpenFileLimit { soft, hard: soft };
        assert_eq!(connection_room_below(limit(1024), 50_000), Some(768));
        assert_eq!(connection_room_below(limit(20_000), 50_000), Some(19_744));
        assert_eq!(connection_room_below(limit(50_256), 50_000), None);
        assert_eq!(connection_room_below(limit(1 << 20), 50_000), None);
        assert_eq!(connection_room_below(limit(100), 10), Some(0));
    }
}
