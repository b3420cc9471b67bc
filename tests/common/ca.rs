//! Registering a tenant CA as an operator does: fetch the tenant's registration code, sign a
//! verification certificate for it with the CA's key, post both.

use drover::devcerts::{PemPair, verification_certificate};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::TestServer;

/// The tenant's current CA registration code.
pub async fn registration_code(server: &TestServer, token: &str) -> String {
    let (status, body) = server.get("/api/mqtt/cas/registration-code", token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["registrationCode"].as_str().unwrap().to_string()
}

/// Registers `ca` for the caller's tenant with proof of possession of its key.
pub async fn register_ca(server: &TestServer, token: &str, ca: &PemPair) -> (StatusCode, Value) {
    let code = registration_code(server, token).await;
    let proof = verification_certificate(ca, &code).unwrap();
    server
        .post(
            "/api/mqtt/cas",
            token,
            json!({"pem": ca.cert, "verificationPem": proof.cert}),
        )
        .await
}
