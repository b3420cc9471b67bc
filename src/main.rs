//! The `drover` command: run the platform, migrate, write a default configuration, administer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use drover::auth::keyfile::KeyFile;
use drover::auth::secrets;
use drover::config::{Config, DEFAULT_CONFIG_TOML, DatabaseTarget};
use drover::storage::records::{AuditActor, NewApiKey, NewUser, UserPatch};
use drover::{logging, server};
use drover_actors::{Role, TenantId};

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "IoT device management platform: MQTT broker, device registry, telemetry, rules and a live dashboard in one binary"
)]
struct Cli {
    /// Configuration file. Default: $DROVER_CONFIG, or ./drover.toml when it exists.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform (the default).
    Serve,
    /// Apply pending registry migrations and exit.
    Migrate,
    /// Print a commented configuration file with every key and its default.
    GenerateConfig {
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Administration on the registry directly (works while the server is stopped).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Analytics over files, without a server.
    #[command(subcommand)]
    Analytics(AnalyticsCommand),
}

#[derive(Subcommand)]
enum AnalyticsCommand {
    /// Score a CSV of `timestamp,value[,value…]` (any header names; timestamps RFC 3339,
    /// `YYYY-MM-DD HH:MM:SS` or epoch) with the streaming detectors, row by row in file order,
    /// and write each row with its score (1.0 = the threshold) and flag.
    Score {
        #[arg(long)]
        input: PathBuf,
        /// zscore, mad, ewma, drift, eif (one forest over all value columns) or ensemble.
        #[arg(long, default_value = "ensemble")]
        method: drover_actors::analytics::detector::Method,
        /// Threshold in the method's unit (standard deviations; a 0..1 score for eif; drift
        /// has none). Default: 3.0, or 0.95 for eif.
        #[arg(long)]
        threshold: Option<f64>,
        /// Where to write the scored rows. Default: standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Statistics, anomalies, forecasts, drift and correlation of a CSV file or of a device on
    /// a running server (--server URL --api-key KEY); prints JSON.
    #[command(flatten)]
    Query(Box<drover::analytics::cli::QueryCommand>),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List tenants.
    ListTenants,
    /// Create a tenant.
    CreateTenant {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Create a user. The password is read from DROVER_PASSWORD, or generated and printed once.
    CreateUser {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: Role,
        #[arg(long)]
        platform_admin: bool,
    },
    /// Give a user a new password (from DROVER_PASSWORD, or generated and printed once).
    ResetPassword { username: String },
    /// Write development certificates for MQTT over TLS: a CA, a server certificate and
    /// device certificates (CN = device id) signed by it.
    DevCerts {
        /// Directory to write them to.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Host names or IP addresses the server certificate is valid for.
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        /// Device ids to issue client certificates for (repeat the flag).
        #[arg(long = "device")]
        devices: Vec<String>,
    },
    /// Sign a verification certificate for registering a CA (proof that you hold its key):
    /// CN = the tenant's code from `GET /api/mqtt/cas/registration-code`, signed by the CA.
    VerificationCert {
        /// The tenant's registration code.
        #[arg(long)]
        code: String,
        /// The CA certificate (PEM).
        #[arg(long, default_value = "certs/ca.pem")]
        ca: PathBuf,
        /// The CA's private key (PEM).
        #[arg(long, default_value = "certs/ca.key")]
        ca_key: PathBuf,
        /// Where to write the verification certificate.
        #[arg(long, default_value = "certs/verification.pem")]
        out: PathBuf,
    },
    /// Create an API key for a tenant and print it once.
    CreateApiKey {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "operator")]
        role: Role,
    },
    /// Add a new login token signing key to the key file; it signs from the next start on,
    /// and tokens signed by the previous key keep working until they expire.
    RotateJwtKey,
}

/// mimalloc rather than glibc's allocator: ingestion allocates and frees many small buffers
/// across threads, where glibc spent about a third of the CPU (measured with perf). Counted
/// when `HEAP_METRICS=1`, for `/metrics` (`drover_heap_allocated_bytes`: live bytes, beside
/// the RSS).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: drover::heap::CountingAlloc<mimalloc::MiMalloc> =
    drover::heap::CountingAlloc(mimalloc::MiMalloc);
/// The C library's malloc, for heap profilers (`--features system-alloc`).
#[cfg(feature = "system-alloc")]
#[global_allocator]
static GLOBAL: drover::heap::CountingAlloc<std::alloc::System> =
    drover::heap::CountingAlloc(std::alloc::System);

fn main() -> ExitCode {
    // Before anything opens a database: SQLite takes its page cache only before first use.
    drover::telemetry::sqlite::pcache::install();
    if std::env::var("HEAP_METRICS").is_ok_and(|v| v == "1" || v == "true") {
        drover::heap::install();
    }
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::GenerateConfig { output, force } = &command {
        return report(generate_config(output.as_ref(), *force));
    }
    if let Command::Analytics(analytics) = &command {
        return report(run_analytics(analytics));
    }
    let config_file = Config::file_to_read(cli.config.as_deref(), |name| std::env::var(name).ok());
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("drover: {error}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config.log);
    for (name, known) in drover::config::misspelled_env_vars(std::env::vars().map(|(name, _)| name)) {
        tracing::warn!(variable = %name, did_you_mean = known, "environment variable ignored: not a Drover setting");
    }
    let system = actix_rt::System::new();
    report(system.block_on(async move {
        match command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::Admin(admin) => administer(config, config_file, admin).await,
            Command::GenerateConfig { .. } | Command::Analytics(_) => {
                unreachable!("handled before the configuration is loaded")
            }
        }
    }))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("drover: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_analytics(command: &AnalyticsCommand) -> anyhow::Result<()> {
    let (input, method, threshold, output) = match command {
        AnalyticsCommand::Score {
            input,
            method,
            threshold,
            output,
        } => (input, method, threshold, output),
        AnalyticsCommand::Query(query) => {
            let answer = drover::analytics::cli::run(query)?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
    };
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let reader = std::io::BufReader::new(file);
    let summary = match output {
        Some(path) => {
            let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            drover::analytics::score_csv(reader, std::io::BufWriter::new(file), *method, *threshold)
        }
        None => drover::analytics::score_csv(reader, std::io::stdout().lock(), *method, *threshold),
    }
    .with_context(|| format!("scoring {}", input.display()))?;
    eprintln!(
        "{} rows, {} scored, {} anomalous ({})",
        summary.rows,
        summary.scored,
        summary.anomalous,
        method.as_str()
    );
    Ok(())
}

fn generate_config(output: Option<&PathBuf>, force: bool) -> anyhow::Result<()> {
    match output {
        None => print!("{DEFAULT_CONFIG_TOML}"),
        Some(path) => {
            if path.exists() && !force {
                bail!("{} exists; pass --force to overwrite it", path.display());
            }
            std::fs::write(path, DEFAULT_CONFIG_TOML)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let admin_password = std::env::var("DROVER_ADMIN_PASSWORD").ok();
    // Installed before anything announces readiness, so an early SIGTERM is a graceful stop.
    let mut signals = Signals::install()?;
    let running = server::start(config, admin_password).await?;
    let host = if running.http_addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        running.http_addr.ip().to_string()
    };
    let base = format!("http://{host}:{}", running.http_addr.port());
    if let Some(first) = &running.first_start {
        let password = match &first.generated_password {
            Some(p) => format!("{p}    (generated; shown only this once)"),
            None => "the value of DROVER_ADMIN_PASSWORD".to_string(),
        };
        println!();
        println!(
            "  First start: created tenant \"{}\" and platform admin \"{}\".",
            first.tenant, first.username
        );
        println!("  Password: {password}");
        println!("  Console:  {base}/  (sign in as \"{}\")", first.username);
        println!("  Log in:   curl -s -X POST {base}/api/auth/login -H 'Content-Type: application/json' \\");
        println!(
            "              -d '{{\"username\": \"{}\", \"password\": \"<password>\"}}'",
            first.username
        );
        println!();
    }
    let mqtt = match running.mqtt_tls_addr {
        Some(tls) => format!("MQTT {}, MQTT over TLS {tls}", running.mqtt_addr),
        None => format!("MQTT {}", running.mqtt_addr),
    };
    println!(
        "Drover {} is running: console {base}/, API {base}/api, health {base}/health, {mqtt}. Ctrl-C stops it.",
        env!("CARGO_PKG_VERSION")
    );
    signals.next().await;
    // A second signal while draining stops at once.
    actix_rt::spawn(async move {
        signals.next().await;
        eprintln!("drover: second signal, exiting without waiting");
        std::process::exit(130);
    });
    running.shutdown().await;
    Ok(())
}

/// SIGINT and SIGTERM, both meaning "stop gracefully".
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let registry = server::open_registry(&config).await?;
    println!(
        "registry is up to date ({} {})",
        registry.database().backend().as_str(),
        registry.database().description()
    );
    Ok(())
}

fn password_from_env() -> anyhow::Result<(String, bool)> {
    match std::env::var("DROVER_PASSWORD") {
        Ok(p) if !p.is_empty() => {
            secrets::check_password_strength(&p)
                .map_err(anyhow::Error::msg)
                .context("DROVER_PASSWORD")?;
            Ok((p, false))
        }
        _ => Ok((secrets::new_password(), true)),
    }
}

fn rotate_jwt_key(config: &Config) -> anyhow::Result<()> {
    let path = drover::bootstrap::key_file_path(config);
    let mut file = KeyFile::load(&path)?.with_context(|| {
        format!(
            "no key file at {}; start the server once to create it",
            path.display()
        )
    })?;
    // Tokens signed by a retired key stay valid for at most their lifetime plus the clock skew.
    let keep = (config.auth.token_ttl_secs + config.auth.clock_skew_secs) as i64;
    let kid = file.rotate_jwt(chrono::Utc::now().timestamp(), keep);
    file.save(&path)?;
    println!("new login token key {kid} written to {}", path.display());
    println!(
        "restart every node to sign with it; tokens signed by the previous key keep working until they expire"
    );
    if !config.auth.jwt_secret.is_empty() {
        println!("note: JWT_SECRET is set and takes precedence over the key file");
    }
    Ok(())
}

/// Admin commands act on the registry the server uses. A SQLite file that is missing means
/// they were pointed elsewhere (the default `./data` is relative to the working directory), and
/// creating an empty registry there would make every command quietly act on the wrong one.
fn require_existing_registry(config: &Config, config_file: Option<&Path>) -> anyhow::Result<()> {
    let DatabaseTarget::Sqlite(path) = config.database_target()? else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    let read = match config_file {
        Some(file) => format!("configuration file {}", file.display()),
        None => "no configuration file".to_string(),
    };
    bail!(
        "no registry database at {} (data directory {:?}, {read}). Admin commands work on an \
         existing registry and never create one: run them in the directory where `drover serve` \
         runs, or point them at its data directory with DATA_DIR=<dir>, or at its configuration \
         with --config <file> or DROVER_CONFIG. (`drover migrate` creates an empty registry.)",
        shown.display(),
        config.storage.data_dir.display().to_string()
    )
}

async fn administer(
    config: Config,
    config_file: Option<PathBuf>,
    command: AdminCommand,
) -> anyhow::Result<()> {
    if let AdminCommand::DevCerts { out, hosts, devices } = &command {
        let certs = drover::devcerts::generate("Drover development CA", hosts, devices)?;
        for path in certs.write(out)? {
            println!("wrote {}", path.display());
        }
        println!(
            "Serve TLS with MQTT_TLS_CERT={0}/server.pem MQTT_TLS_KEY={0}/server.key;",
            out.display()
        );
        println!(
            "register {0}/ca.pem with POST /api/mqtt/cas (with a verification certificate from \
             `drover admin verification-cert`) so device certificates it signed can log in.",
            out.display()
        );
        return Ok(());
    }
    if let AdminCommand::RotateJwtKey = &command {
        return rotate_jwt_key(&config);
    }
    if let AdminCommand::VerificationCert {
        code,
        ca,
        ca_key,
        out,
    } = &command
    {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        let ca = drover::devcerts::PemPair {
            cert: read(ca)?,
            key: read(ca_key)?,
        };
        let proof = drover::devcerts::verification_certificate(&ca, code)?;
        std::fs::write(out, proof.cert).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
        println!(
            "register the CA with POST /api/mqtt/cas {{\"pem\": <CA PEM>, \"verificationPem\": <this file>}}."
        );
        return Ok(());
    }
    require_existing_registry(&config, config_file.as_deref())?;
    let registry = server::open_registry(&config).await?;
    let by = AuditActor {
        tenant: None,
        actor: "cli".into(),
        source_ip: None,
    };
    match command {
        AdminCommand::ListTenants => {
            let tenants = registry.list_tenants().await?;
            if tenants.is_empty() {
                eprintln!("no tenants in {}", registry.database().description());
            }
            for t in tenants {
                println!(
                    "{}\t{}\t{}",
                    t.id,
                    if t.disabled { "disabled" } else { "enabled" },
                    t.name
                );
            }
        }
        AdminCommand::CreateTenant { id, name } => {
            let id = TenantId::parse(id)?;
            let name = name.unwrap_or_else(|| id.to_string());
            let (tenant, _) = registry.create_tenant(id, name, None, by).await?;
            println!("created tenant {}", tenant.id);
        }
        AdminCommand::CreateUser {
            tenant,
            username,
            role,
            platform_admin,
        } => {
            let (password, generated) = password_from_env()?;
            let hash = secrets::hash_password(&password)?;
            let user = NewUser {
                tenant: TenantId::parse(tenant)?,
                username,
                password_hash: hash,
                role,
                platform_admin,
            };
            let user = registry.create_user(user, by).await?;
            println!(
                "created user {} ({}) in tenant {}",
                user.username, user.role, user.tenant
            );
            if generated {
                println!("password: {password}");
            }
        }
        AdminCommand::ResetPassword { username } => {
            let found = registry
                .user_credentials(&username)
                .await?
                .with_context(|| format!("no user {username}"))?;
            let (password, generated) = password_from_env()?;
            let patch = UserPatch {
                password_hash: Some(secrets::hash_password(&password)?),
                ..UserPatch::default()
            };
            registry
                .update_user(found.user.tenant, found.user.id, patch, by)
                .await?;
            println!("password of {username} changed");
            if generated {
                println!("password: {password}");
            }
        }
        AdminCommand::DevCerts { .. }
        | AdminCommand::RotateJwtKey
        | AdminCommand::VerificationCert { .. } => {
            unreachable!("handled before the registry is opened")
        }
        AdminCommand::CreateApiKey { tenant, name, role } => {
            let key = secrets::new_secret(secrets::API_KEY_PREFIX);
            let new = NewApiKey {
                tenant: TenantId::parse(tenant)?,
                name,
                role,
                digest: secrets::digest(&key),
                prefix: secrets::display_prefix(&key),
                created_by: "cli".into(),
                expires_at: None,
            };
            let created = registry.create_api_key(new, by).await?;
            println!(
                "created API key {} ({}) for tenant {}",
                created.id, created.role, created.tenant
            );
            println!("key: {key}");
        }
    }
    Ok(())
}
