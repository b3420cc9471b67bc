//! Device certificates across tenants: registering a CA takes proof of possession of its key,
//! and a certificate logs in only as a device of the tenant whose CA issued it. Driven with
//! mosquitto_pub (Debian's mosquitto-clients) over the TLS listener.

mod common;

use std::time::Duration;

use common::ca::{register_ca, registration_code};
use common::mosquitto::{args, mosquitto, publish};
use common::{Backend, TestServer, eventually};
use drover::devcerts::{DevCerts, PemPair, generate, verification_certificate};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::StatusCode;
use serde_json::json;

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_string_lossy().to_string()
}

/// mosquitto_pub arguments publishing one message as `device` with its certificate in `dir`.
fn cert_login(server_ca: &str, dir: &tempfile::TempDir, device: &str) -> Vec<String> {
    args(&[
        "--cafile",
        server_ca,
        "--cert",
        &path(dir, &format!("device-{device}.pem")),
        "--key",
        &path(dir, &format!("device-{device}.key")),
        "-i",
        device,
        "-q",
        "1",
        "-t",
        &format!("devices/{device}/telemetry"),
        "-m",
        r#"{"metrics":{"t":1}}"#,
    ])
}

async fn last_seen(server: &TestServer, token: &str, device: &str) -> Option<String> {
    let (status, body) = server.get(&format!("/api/devices/{device}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["lastSeenAt"].as_str().map(str::to_string)
}

fn written(certs: &DevCerts) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    certs.write(dir.path()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_never_logs_into_another_tenant_with_the_same_device_id() {
    if !mosquitto() {
        return;
    }
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let device = "b-dev-1".to_string();
    let a_certs = generate("Tenant A CA", &hosts, std::slice::from_ref(&device)).unwrap();
    let b_certs = generate("Tenant B CA", &hosts, std::slice::from_ref(&device)).unwrap();
    let (a_dir, b_dir) = (written(&a_certs), written(&b_certs));
    let (cert, key) = (path(&a_dir, "server.pem"), path(&a_dir, "server.key"));
    let server = TestServer::start_with(Backend::Sqlite, move |c| {
        c.mqtt.tls_cert = cert;
        c.mqtt.tls_key = key;
        c.mqtt.tls_port = 0;
    })
    .unwrap();
    let tls_port = server.mqtt_tls.expect("TLS listener").port().to_string();
    let server_ca = path(&a_dir, "ca.pem");
    // Tenant A (the default tenant) and tenant B each have a device b-dev-1.
    let a = server.admin_token().await;
    let b = server.tenant_admin(&a, "tenant-b").await;
    for token in [&a, &b] {
        server
            .register(token, json!({"deviceId": device, "type": "sensor"}))
            .await;
    }

    // A cannot register B's (public) CA certificate: it cannot sign B's code... nor its own.
    let (status, body) = server
        .post("/api/mqtt/cas", &a, json!({"pem": b_certs.ca.cert}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("verificationPem: required"),
        "{body}"
    );
    let forged = verification_certificate(&a_certs.ca, &registration_code(&server, &a).await).unwrap();
    let (status, body) = server
        .post(
            "/api/mqtt/cas",
            &a,
            json!({"pem": b_certs.ca.cert, "verificationPem": forged.cert}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not signed by this CA"),
        "{body}"
    );
    // A verification certificate for another tenant's code does not serve either.
    let b_code = registration_code(&server, &b).await;
    let for_b = verification_certificate(&a_certs.ca, &b_code).unwrap();
    let (status, body) = server
        .post(
            "/api/mqtt/cas",
            &a,
            json!({"pem": a_certs.ca.cert, "verificationPem": for_b.cert}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("registration code"),
        "{body}"
    );

    // Each tenant registers its own CA with proof; a code serves once.
    let (status, body) = register_ca(&server, &a, &a_certs.ca).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = register_ca(&server, &b, &b_certs.ca).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = server
        .post(
            "/api/mqtt/cas",
            &b,
            json!({"pem": b_certs.ca.cert, "verificationPem": verification_certificate(&b_certs.ca, &b_code).unwrap().cert}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a used code: {body}");

    // B's certificate for b-dev-1 logs into B's b-dev-1, never A's.
    let (code, out) = publish(&tls_port, &cert_login(&server_ca, &b_dir, &device));
    assert_eq!(code, 0, "{out}");
    eventually(Duration::from_secs(10), "B's device seen", || async {
        last_seen(&server, &b, &device).await.is_some()
    })
    .await;
    assert_eq!(
        last_seen(&server, &a, &device).await,
        None,
        "B's certificate reached tenant A"
    );
    // And A's certificate logs into A's.
    let (code, out) = publish(&tls_port, &cert_login(&server_ca, &a_dir, &device));
    assert_eq!(code, 0, "{out}");
    eventually(Duration::from_secs(10), "A's device seen", || async {
        last_seen(&server, &a, &device).await.is_some()
    })
    .await;

    // B's CA is an intermediate that A's CA signed: B's certificates (sent with the
    // intermediate) still identify B's devices only, since B's CA issued them.
    let (intermediate, leaf) = intermediate_and_leaf(&a_certs, "b-dev-2");
    let chain_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        chain_dir.path().join("device-b-dev-2.pem"),
        format!("{}{}", leaf.cert, intermediate.cert),
    )
    .unwrap();
    std::fs::write(chain_dir.path().join("device-b-dev-2.key"), &leaf.key).unwrap();
    let (status, body) = register_ca(&server, &b, &intermediate).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for token in [&a, &b] {
        server
            .register(token, json!({"deviceId": "b-dev-2", "type": "sensor"}))
            .await;
    }
    let (code, out) = publish(&tls_port, &cert_login(&server_ca, &chain_dir, "b-dev-2"));
    assert_eq!(code, 0, "{out}");
    eventually(Duration::from_secs(10), "B's b-dev-2 seen", || async {
        last_seen(&server, &b, "b-dev-2").await.is_some()
    })
    .await;
    assert_eq!(
        last_seen(&server, &a, "b-dev-2").await,
        None,
        "B's certificate reached tenant A"
    );

    // Once B removes its CA, B's certificate logs in nowhere (A's CA did not issue it).
    let (_, cas) = server.get("/api/mqtt/cas", &b).await;
    let id = cas["cas"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = server.delete(&format!("/api/mqtt/cas/{id}"), &b).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, _) = publish(&tls_port, &cert_login(&server_ca, &b_dir, &device));
    assert_ne!(code, 0);
}

/// An intermediate CA signed by `root`'s CA, and a client certificate for `device` it signed.
fn intermediate_and_leaf(root: &DevCerts, device: &str) -> (PemPair, PemPair) {
    let root = Issuer::from_ca_cert_pem(&root.ca.cert, KeyPair::from_pem(&root.ca.key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "Tenant B intermediate CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &root).unwrap();
    let intermediate = PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    let issuer = Issuer::new(params, key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, device);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    (
        intermediate,
        PemPair {
            cert: leaf.pem(),
            key: leaf_key.serialize_pem(),
        },
    )
}
