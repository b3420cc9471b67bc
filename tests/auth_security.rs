//! Attacks on logins and keys: memory exhaustion through the login throttle, locking the owner
//! out, logins surviving a password change, signing keys readable with the database, and
//! `/health` telling outsiders where the data lives.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{ADMIN_PASSWORD, Backend, TestServer};
use drover::auth::JwtKeys;
use drover::auth::jwt::TokenSubject;
use drover::auth::keyfile::KeyFile;
use drover::config::Secret;
use drover_actors::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A client whose connections come from `source` (any 127.x address is loopback).
fn client_from(source: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(source))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn login_from(
    server: &TestServer,
    client: &reqwest::Client,
    username: &str,
    password: &str,
) -> (StatusCode, Value) {
    let response = client
        .post(server.url("/api/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_throttled_per_username_and_source_in_bounded_memory() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.auth.max_failed_logins = 5;
        c.auth.max_failed_logins_per_source = 1000;
        c.auth.login_throttle_entries = 100;
    })
    .unwrap();
    let x = client_from(Ipv4Addr::new(127, 0, 0, 1));
    let y = client_from(Ipv4Addr::new(127, 0, 0, 2));

    // Credential fields are capped before anything else reads them.
    let (status, body) = login_from(&server, &x, &"u".repeat(900_000), "whatever-password").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "field_too_long");
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with("username"),
        "{body}"
    );
    let (status, body) = login_from(&server, &x, "admin", &"p".repeat(10_000)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with("password"),
        "{body}"
    );

    // Five bad logins for admin from X lock admin from X only: the owner logs in from Y.
    for _ in 0..5 {
        let (status, _) = login_from(&server, &x, "admin", "wrong-password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = login_from(&server, &x, "admin", ADMIN_PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_attempts");
    let (status, body) = login_from(&server, &y, "admin", ADMIN_PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "the owner is not locked out: {body}");

    // Many distinct failed usernames: the table stays at its cap (100 pairs + the sources).
    for i in 0..250 {
        let (status, _) = login_from(&server, &x, &format!("sprayed-user-{i}"), "wrong-password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let held = server.state.login_throttle.len();
    assert!((100..=102).contains(&held), "{held} entries held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_ends_earlier_logins_and_health_hides_details() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    let (status, bob) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "bob", "password": "bob-password-1", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{bob}");
    let bob_id = bob["id"].as_str().unwrap().to_string();

    // Bob changes his own password: his earlier login ends, the new one works.
    let first = server.login("bob", "bob-password-1").await;
    let (status, _) = server.get("/api/auth/me", &first).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .patch(
            &format!("/api/users/{bob_id}"),
            &first,
            json!({"password": "bob-password-2", "currentPassword": "bob-password-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server.get("/api/auth/me", &first).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "token_revoked");
    let second = server.login("bob", "bob-password-2").await;
    let (status, _) = server.get("/api/auth/me", &second).await;
    assert_eq!(status, StatusCode::OK);

    // An admin resets it: that login ends too; the admin's own goes on.
    let (status, body) = server
        .patch(
            &format!("/api/users/{bob_id}"),
            &admin,
            json!({"password": "bob-password-3"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = server.get("/api/auth/me", &second).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server.get("/api/auth/me", &admin).await;
    assert_eq!(status, StatusCode::OK);

    // A new password that is too long is refused by name.
    let third = server.login("bob", "bob-password-3").await;
    let (status, body) = server
        .patch(
            &format!("/api/users/{bob_id}"),
            &third,
            json!({"password": "x".repeat(300), "currentPassword": "bob-password-3"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "field_too_long");

    // /health: statuses for anyone (also a tenant user), details for the platform admin.
    let data_dir = server.data_dir.path().to_string_lossy().to_string();
    for token in [None, Some(third.as_str())] {
        let (status, body) = server.call(Method::GET, "/health", token, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["checks"]["registry"], json!({"status": "up"}));
        let text = body.to_string();
        assert!(!text.contains(&data_dir) && !text.contains("sqlite"), "{text}");
        assert!(body.get("version").is_none(), "{text}");
    }
    let (status, body) = server.get("/health", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["version"].is_string(), "{body}");
    assert!(
        body["checks"]["registry"]["target"]
            .as_str()
            .unwrap()
            .contains(&data_dir),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_live_in_a_private_key_file_and_rotate() {
    // No JWT_SECRET: the keys come from the key file, as on a default installation.
    let mut server =
        TestServer::start_with(Backend::Sqlite, |c| c.auth.jwt_secret = Secret::default()).unwrap();
    let dir = server.data_dir.path().to_path_buf();
    let key_file = dir.join("keys.json");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&key_file), 0o600);
    for file in ["drover.db", "drover.db-wal", "telemetry.db", "telemetry.db-wal"] {
        if file.ends_with("-wal") && !dir.join(file).exists() {
            continue;
        }
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&dir.join("spool")), 0o700);
    let registry = server.state.registry.clone();
    assert_eq!(registry.setting("jwt_secret").await.unwrap(), None);
    assert_eq!(registry.setting("rules_secret_key").await.unwrap(), None);

    // A registry from before key files: its keys are moved into the file on start, and the
    // rules key that sealed the channel secrets is kept.
    let keys = KeyFile::load(&key_file).unwrap().unwrap();
    let sealing_key = keys.rules_secret_key.clone();
    let legacy_jwt = "legacy-jwt-secret-legacy-jwt-secret-0123";
    registry
        .setting_or_insert("jwt_secret", || legacy_jwt.to_string())
        .await
        .unwrap();
    registry
        .setting_or_insert("rules_secret_key", {
            let key = sealing_key.clone();
            move || key
        })
        .await
        .unwrap();
    let fingerprint = registry
        .setting("rules_secret_key_fingerprint")
        .await
        .unwrap()
        .unwrap();
    registry
        .delete_setting("rules_secret_key_fingerprint", &fingerprint)
        .await
        .unwrap();
    std::fs::remove_file(&key_file).unwrap();
    server.restart();
    let registry = server.state.registry.clone();
    assert_eq!(registry.setting("jwt_secret").await.unwrap(), None);
    assert_eq!(registry.setting("rules_secret_key").await.unwrap(), None);
    let keys = KeyFile::load(&key_file).unwrap().unwrap();
    assert_eq!(keys.rules_secret_key, sealing_key);
    assert_eq!(mode(&key_file), 0o600);
    // The token a stored secret could sign is only as good as that secret: the legacy one now
    // lives in the file and signs.
    let (_, me) = server.get("/api/auth/me", &server.admin_token().await).await;
    let user_id = me["id"].as_str().unwrap().to_string();
    let subject = || TokenSubject {
        user_id: &user_id,
        username: "admin",
        tenant: "default",
        role: Role::Admin,
        platform_admin: true,
        generation: 0,
    };
    let legacy_token = JwtKeys::new(legacy_jwt.as_bytes(), 3600, 60)
        .issue(subject())
        .unwrap()
        .0;
    let (status, _) = server.get("/api/auth/me", &legacy_token).await;
    assert_eq!(status, StatusCode::OK);

    // Rotation with the admin command: new tokens are signed by the new key, the old key's
    // tokens keep working, and a key id the server does not hold is refused.
    let before = server.admin_token().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["admin", "rotate-jwt-key"])
        .current_dir(&dir)
        .env("DATA_DIR", &dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rotated = KeyFile::load(&key_file).unwrap().unwrap();
    let new_kid = rotated.jwt_keys.last().unwrap().kid.clone();
    assert_eq!(rotated.jwt_keys.len(), 2);
    assert_eq!(mode(&key_file), 0o600);
    server.restart();
    let (status, body) = server.get("/api/auth/me", &before).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a rotated-out key verifies its tokens: {body}"
    );
    let after = server.admin_token().await;
    let header = jsonwebtoken::decode_header(&after).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));
    let unknown = JwtKeys::new(b"some-other-key-some-other-key-0123", 3600, 60)
        .issue(subject())
        .unwrap()
        .0;
    let (status, body) = server.get("/api/auth/me", &unknown).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key id"),
        "{body}"
    );
}

#[test]
fn dev_certs_private_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        drover::devcerts::generate("test CA", &["localhost".to_string()], &["d1".to_string()]).unwrap();
    for path in certs.write(dir.path()).unwrap() {
        let expected = if path.extension().is_some_and(|e| e == "key") {
            0o600
        } else {
            0o644
        };
        assert_eq!(mode(&path) & expected, mode(&path), "{}", path.display());
        if expected == 0o600 {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}
