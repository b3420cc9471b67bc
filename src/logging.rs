//! Structured logs with `tracing`: human-readable text or one JSON object per line.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Targets held below `log.level`: rustls warns on every TLS handshake whose SNI is an IP
/// address, which mosquitto_pub and other clients send for `-h 127.0.0.1`; the name is ignored
/// and the handshake goes on, so a line per connection only buries what matters.
const QUIETED: &str = "rustls::msgs::handshake=error";

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.level`.
/// Does nothing if one is installed already (tests start several servers).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIETED},{}", config.level)));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
