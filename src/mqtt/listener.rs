//! The MQTT listeners: plain and TLS ports served by ntex on threads of their own, next to the
//! actix system, and stopped with it.
//!
//! TLS client certificates are optional at the TLS layer and checked after the handshake
//! against the CAs registered for tenants (which change at run time through the API), so
//! the TLS verifier here only proves that the client holds the certificate's key.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ntex::io::{Filter, Io, IoConfig, Layer};
use ntex::server::rustls::TlsAcceptor;
use ntex::service::cfg::SharedCfg;
use ntex::service::{ServiceFactory, chain_factory, fn_factory_with_config, fn_service};
use ntex::time::Seconds;
use ntex_mqtt::{MqttError, MqttServer, MqttServiceConfig, QoS};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::broker::reason;
use super::connection::{BrokerError, Connection, MqttContext};
use super::inflight::InFlight;
use super::qos2::Qos2Layer;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen for MQTT on {addr}: {error}{}", hint(error))]
    Bind { addr: String, error: std::io::Error },
    #[error("MQTT TLS: {0}")]
    Tls(String),
}

fn hint(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        " (is another MQTT broker running there? choose other ports with MQTT_PORT and MQTT_TLS_PORT)"
    } else {
        ""
    }
}

/// Bound, not yet serving.
pub struct Listeners {
    plain: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
}

/// Binds the configured ports (so port 0 resolves before anything else starts).
pub fn bind(config: &Config) -> Result<Listeners, ListenError> {
    let mqtt = &config.mqtt;
    let listen = |port: u16| {
        let addr = format!("{}:{port}", mqtt.bind);
        let parsed: SocketAddr = addr.parse().map_err(|e| ListenError::Bind {
            addr: addr.clone(),
            error: std::io::Error::other(e),
        })?;
        ntex::server::create_tcp_listener(parsed, 1024).map_err(|error| ListenError::Bind { addr, error })
    };
    let plain = listen(mqtt.port)?;
    let addr = plain.local_addr().map_err(|error| ListenError::Bind {
        addr: "mqtt".into(),
        error,
    })?;
    let tls = if config.mqtt_tls_enabled() {
        let tls_config = tls_config(&mqtt.tls_cert, &mqtt.tls_key)?;
        Some((listen(mqtt.tls_port)?, tls_config))
    } else {
        None
    };
    let tls_addr = tls
        .as_ref()
        .map(|(l, _)| l.local_addr())
        .transpose()
        .map_err(|error| ListenError::Bind {
            addr: "mqtts".into(),
            error,
        })?;
    Ok(Listeners {
        plain,
        tls,
        addr,
        tls_addr,
    })
}

fn tls_config(cert_path: &str, key_path: &str) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    let read =
        |path: &str| std::fs::read(path).map_err(|e| ListenError::Tls(format!("cannot read {path}: {e}")));
    let cert_pem = read(cert_path)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| ListenError::Tls(format!("{cert_path}: {e}")))?;
    if certs.is_empty() {
        return Err(ListenError::Tls(format!(
            "{cert_path}: no certificate in the file"
        )));
    }
    let key_pem = read(key_path)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| ListenError::Tls(format!("{key_path}: {e}")))?
        .ok_or_else(|| ListenError::Tls(format!("{key_path}: no private key in the file")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(TenantCaVerifier { provider }))
        .with_single_cert(certs, key)
        .map_err(|e| ListenError::Tls(format!("certificate and key do not fit together: {e}")))?;
    Ok(Arc::new(config))
}

/// Asks for a client certificate without requiring one; verifies the TLS signature (possession
/// of the key) here and the chain per tenant after the handshake.
#[derive(Debug)]
struct TenantCaVerifier {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for TenantCaVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain is verified against the tenant CAs in the MQTT handshake (see auth.rs).
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Bytes of one client's inbound messages handled at once before its reading waits.
fn max_receive_size(config: &Config) -> usize {
    (config.mqtt.max_packet_size as usize).saturating_mul(4)
}

fn service_config(config: &Config) -> SharedCfg {
    let mqtt = &config.mqtt;
    let timeout = Seconds(mqtt.connect_timeout_secs);
    SharedCfg::new("MQTT")
        .add(
            MqttServiceConfig::new()
                // ntex-mqtt's default is QoS 1.
                .set_max_qos(QoS::ExactlyOnce)
                .set_max_size(mqtt.max_packet_size)
                .set_max_receive(mqtt.receive_maximum)
                // Enforced by the middleware `serve` builds from the same function.
                .set_max_receive_size(max_receive_size(config))
                .set_max_send(mqtt.max_inflight)
                .set_max_topic_alias(mqtt.max_topic_alias)
                .set_connect_timeout(timeout)
                .protocol_version_timeout(timeout)
                // A publish read just before the client hung up is still handled (mosquitto_pub -q 0).
                .set_handle_qos_after_disconnect(Some(QoS::ExactlyOnce)),
        )
        .add(IoConfig::new().set_disconnect_timeout(Seconds(2)))
        .add(ntex::tls::TlsConfig::new().set_handshake_timeout(timeout))
        .into()
}

fn mqtt_service<F: Filter>(
    ctx: Arc<MqttContext>,
    (in_flight_v3, in_flight_v5): (InFlight, InFlight),
) -> impl ServiceFactory<Io<F>, SharedCfg, Response = (), Error = MqttError<BrokerError>, InitError = ()> {
    use ntex_mqtt::{v3 as mqtt3, v5 as mqtt5};
    let (c3, c5) = (ctx.clone(), ctx);
    MqttServer::new()
        .v3(
            mqtt3::MqttServer::new(move |hs| super::v3::handshake(c3.clone(), hs))
                .replace_middlewares(in_flight_v3)
                .protocol(super::v3::protocol())
                .control(super::v3::control())
                .publish(fn_factory_with_config(
                    async |session: mqtt3::Session<Rc<Connection>>| {
                        Ok::<_, BrokerError>(fn_service(move |p| super::v3::publish(session.clone(), p)))
                    },
                )),
        )
        .v5(
            mqtt5::MqttServer::new(move |hs| super::v5::handshake(c5.clone(), hs))
                .replace_middlewares(in_flight_v5)
                .protocol(super::v5::protocol())
                .control(super::v5::control())
                .publish(fn_factory_with_config(
                    async |session: mqtt5::Session<Rc<Connection>>| {
                        Ok::<_, BrokerError>(fn_service(move |p| super::v5::publish(session.clone(), p)))
                    },
                )),
        )
}

/// Puts the layer that answers inbound QoS 2 retransmissions (and hands PUBLISH packets up
/// whole) under the MQTT codec.
fn with_qos2_layer<F: Filter>(
    max_packet_size: u32,
) -> impl ServiceFactory<
    Io<F>,
    SharedCfg,
    Response = Io<Layer<Qos2Layer, F>>,
    Error = MqttError<BrokerError>,
    InitError = (),
> {
    fn_service(async move |io: Io<F>| Ok(io.add_filter(Qos2Layer::new(max_packet_size))))
}

/// The running MQTT server.
pub struct MqttListener {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    server: ntex::server::Server,
    thread: Option<JoinHandle<()>>,
    ctx: Arc<MqttContext>,
}

/// Serves the bound listeners on `config.mqtt_workers()` threads.
pub fn serve(
    listeners: Listeners,
    ctx: Arc<MqttContext>,
    config: &Config,
) -> Result<MqttListener, ListenError> {
    let Listeners {
        plain,
        tls,
        addr,
        tls_addr,
    } = listeners;
    let workers = config.mqtt_workers();
    let max_packet_size = config.mqtt.max_packet_size;
    // The limits ntex-mqtt's own middleware takes from `service_config`; MQTT 5's Receive
    // Maximum is enforced by its dispatcher, so only the size limit applies there.
    let in_flight = (
        InFlight::new(config.mqtt.receive_maximum, max_receive_size(config)),
        InFlight::new(0, max_receive_size(config)),
    );
    let cfg = service_config(config);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let service_ctx = ctx.clone();
    let thread = std::thread::Builder::new()
        .name("mqtt".into())
        .spawn(move || {
            let system = ntex::rt::System::build()
                .name("mqtt")
                .disable_signals()
                .build(ntex::rt::DefaultRuntime);
            let outcome = system.block_on(async move {
                let plain_ctx = service_ctx.clone();
                let mut builder = ntex::server::build()
                    .name("mqtt")
                    .workers(workers)
                    // Connections are counted and limited by the broker itself (MAX_DEVICES).
                    .maxconn(1_000_000)
                    .backlog(1024)
                    .disable_signals()
                    .shutdown_timeout(Seconds(5))
                    .listen("mqtt", plain, async move |_| {
                        chain_factory(with_qos2_layer(max_packet_size))
                            .and_then(mqtt_service(plain_ctx.clone(), in_flight))
                            .map_err(|e: MqttError<BrokerError>| {
                                tracing::debug!(error = %e, "MQTT connection ended with an error");
                                e
                            })
                    })?
                    .config("mqtt", cfg.clone());
                if let Some((listener, tls_config)) = tls {
                    let tls_ctx = service_ctx.clone();
                    builder = builder
                        .listen("mqtts", listener, async move |_| {
                            chain_factory(TlsAcceptor::new(tls_config.clone()))
                                .map_err(|e| MqttError::Service(BrokerError::Internal(format!("TLS: {e}"))))
                                .and_then(with_qos2_layer(max_packet_size))
                                .and_then(mqtt_service(tls_ctx.clone(), in_flight))
                        })?
                        .config("mqtts", cfg);
                }
                let server = builder.run();
                let _ = started_tx.send(Ok(server.clone()));
                server.await
            });
            if let Err(error) = outcome {
                tracing::error!(%error, "MQTT server stopped with an error");
            }
        })
        .map_err(|error| ListenError::Bind {
            addr: "mqtt thread".into(),
            error,
        })?;
    let server = started_rx
        .recv()
        .map_err(|_| ListenError::Bind {
            addr: addr.to_string(),
            error: std::io::Error::other("MQTT server failed to start"),
        })?
        .map_err(|error: std::io::Error| ListenError::Bind {
            addr: addr.to_string(),
            error,
        })?;
    Ok(MqttListener {
        addr,
        tls_addr,
        server,
        thread: Some(thread),
        ctx,
    })
}

impl MqttListener {
    /// Tells every client the server is going away (MQTT 5: DISCONNECT 0x8B), lets the
    /// outbound tasks write that, then stops the listeners and their threads.
    pub async fn stop(mut self) {
        let told =
            self.ctx
                .broker
                .disconnect_where(reason::SERVER_SHUTTING_DOWN, "server shutting down", |_| true);
        if told > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.server.stop(true).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
