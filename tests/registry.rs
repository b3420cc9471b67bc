//! The registry API, run against SQLite and against PostgreSQL (`DROVER_TEST_POSTGRES_URL`).

mod common;

use chrono::{Duration, Utc};
use common::{ADMIN_PASSWORD, Backend, JWT_SECRET, TestServer};
use drover::auth::JwtKeys;
use drover::auth::jwt::TokenSubject;
use drover_actors::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

on_both_backends!(
    login_keys_and_whoami,
    register_list_filter_and_page,
    read_patch_rotate_and_delete,
    bad_input_is_refused_and_writes_nothing,
    tenants_are_isolated,
    roles_are_enforced,
    expired_forged_and_missing_tokens_are_refused,
    groups_and_members,
    users_and_password_rules,
    failed_logins_lock_the_username,
    device_limit_is_enforced,
    registered_devices_are_found_through_their_supervisor,
);

fn ids(list: &Value) -> Vec<String> {
    list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap().to_string())
        .collect()
}

async fn audit(server: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let (status, body) = server.get(&format!("/api/audit?{query}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["entries"].as_array().unwrap().clone()
}

async fn login_keys_and_whoami(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let (status, me) = server.get("/api/auth/me", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["tenant"], "default");
    assert_eq!(me["role"], "admin");
    assert_eq!(me["platformAdmin"], true);

    let (status, created) = server
        .post(
            "/api/keys",
            &admin,
            json!({"name": "ingest", "role": "operator", "expiresInDays": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("drv_"));
    let key_id = created["apiKey"]["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(created["apiKey"]["prefix"].as_str().unwrap()));

    // The key works, as a bearer token and as X-API-Key.
    let (status, me) = server.get("/api/auth/me", &key).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["kind"], "api_key");
    assert_eq!(me["role"], "operator");
    let response = server
        .client
        .get(server.url("/api/auth/me"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The list never shows the key itself.
    let (_, list) = server.get("/api/keys", &admin).await;
    assert!(!list.to_string().contains(&key));
    assert_eq!(list["apiKeys"][0]["status"], "active");

    // Revoked keys stop working at once.
    let (status, revoked) = server.delete(&format!("/api/keys/{key_id}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(revoked["status"], "revoked");
    let (status, body) = server.get("/api/auth/me", &key).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "api_key_revoked");

    // Unknown key.
    let (status, body) = server
        .get("/api/auth/me", "drv_notakeynotakeynotakeynotakeynotakeynotakey")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_api_key");

    // A key cannot outrank its creator, and bad bodies are refused.
    let (status, body) = server
        .post("/api/keys", &admin, json!({"name": "x", "role": "root"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = server
        .post(
            "/api/keys",
            &admin,
            json!({"name": "x", "role": "viewer", "expiresInDays": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Wrong password.
    let (status, body) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "admin", "password": "wrong-password"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_credentials");
    let (status, body) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "nobody", "password": "wrong-password"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body["error"]["code"], "invalid_credentials",
        "unknown users look like wrong passwords"
    );
}

async fn register_list_filter_and_page(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let key = server.api_key(&admin, "operator").await;
    let (status, _) = server
        .post(
            "/api/groups",
            &key,
            json!({"name": "line-1", "description": "Assembly line 1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // The body of the product description, exactly.
    let (status, registered) = server
        .post(
            "/api/devices/register",
            &key,
            json!({"deviceId": "sensor-001", "type": "temperature", "metadata": {"location": "warehouse-a", "model": "DHT22"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["device"]["deviceId"], "sensor-001");
    assert_eq!(registered["device"]["status"], "offline");
    let token = registered["token"].as_str().unwrap();
    assert!(
        token.starts_with("dvt_") && token.len() == 47,
        "256-bit token: {token}"
    );

    server.register(&key, json!({"deviceId": "sensor-002", "type": "temperature", "metadata": {"location": "warehouse-b", "floor": 3}, "tags": ["critical"]})).await;
    server.register(&key, json!({"deviceId": "sensor-003", "type": "humidity", "metadata": {"location": "warehouse-a"}, "tags": ["critical", "outdoor"], "groups": ["line-1"]})).await;
    server
        .register(
            &key,
            json!({"deviceId": "pump-001", "type": "pump", "groups": ["line-1"]}),
        )
        .await;
    server
        .register(
            &key,
            json!({"deviceId": "pump-002", "type": "pump", "metadata": {"active": true}}),
        )
        .await;

    let (_, all) = server.get("/api/devices", &key).await;
    assert_eq!(all["total"], 5);
    assert_eq!(
        ids(&all),
        ["pump-001", "pump-002", "sensor-001", "sensor-002", "sensor-003"]
    );

    let cases: &[(&str, &[&str])] = &[
        ("type=temperature", &["sensor-001", "sensor-002"]),
        ("tag=critical", &["sensor-002", "sensor-003"]),
        ("group=line-1", &["pump-001", "sensor-003"]),
        ("metadata.location=warehouse-a", &["sensor-001", "sensor-003"]),
        ("metadata.floor=3", &["sensor-002"]),
        ("metadata.active=true", &["pump-002"]),
        ("type=temperature&metadata.location=warehouse-a", &["sensor-001"]),
        ("tag=critical&group=line-1", &["sensor-003"]),
        ("status=offline&type=pump", &["pump-001", "pump-002"]),
        ("status=online", &[]),
        ("metadata.location=nowhere", &[]),
    ];
    for (query, expected) in cases {
        let (status, list) = server.get(&format!("/api/devices?{query}"), &key).await;
        assert_eq!(status, StatusCode::OK, "{query}: {list}");
        assert_eq!(ids(&list), *expected, "{query}");
        assert_eq!(list["total"], expected.len(), "{query}");
    }

    // Keyset paging visits every device once.
    let mut seen = Vec::new();
    let mut path = "/api/devices?limit=2".to_string();
    loop {
        let (_, page) = server.get(&path, &key).await;
        assert_eq!(page["total"], 5);
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/devices?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["pump-001", "pump-002", "sensor-001", "sensor-002", "sensor-003"]
    );

    for bad in [
        "status=asleep",
        "limit=0",
        "limit=100000",
        "colour=red",
        "group=a/b",
    ] {
        let (status, body) = server.get(&format!("/api/devices?{bad}"), &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    // Stats count what was registered.
    let (_, stats) = server.get("/stats", &key).await;
    assert_eq!(stats["devices"]["registered"], 5);
    assert_eq!(stats["devices"]["connected"], 0);
}

async fn read_patch_rotate_and_delete(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let first_token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature", "metadata": {"location": "warehouse-a", "model": "DHT22"}, "tags": ["a"]}))
        .await;

    let (status, device) = server.get("/api/devices/sensor-001", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device["metadata"]["model"], "DHT22");

    // Merge patch: change one key, remove one with null, add one; tags are replaced.
    let (status, device) = server
        .patch("/api/devices/sensor-001", &admin, json!({"type": "thermometer", "metadata": {"location": "warehouse-c", "model": null, "floor": 2}, "tags": ["b", "c"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["type"], "thermometer");
    assert_eq!(device["metadata"], json!({"location": "warehouse-c", "floor": 2}));
    assert_eq!(device["tags"], json!(["b", "c"]));

    let (status, device) = server
        .post(
            "/api/devices/sensor-001/tags",
            &admin,
            json!({"tags": ["c", "d"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device["tags"], json!(["b", "c", "d"]));
    let (status, device) = server.delete("/api/devices/sensor-001/tags/b", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device["tags"], json!(["c", "d"]));
    let (status, _) = server.delete("/api/devices/sensor-001/tags/zzz", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Disable.
    let (status, device) = server
        .patch("/api/devices/sensor-001", &admin, json!({"enabled": false}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device["status"], "disabled");
    let (_, list) = server.get("/api/devices?status=disabled", &admin).await;
    assert_eq!(ids(&list), ["sensor-001"]);

    // PATCH refuses fields it does not know (a typo must not be silently ignored) and id changes.
    let (status, body) = server
        .patch("/api/devices/sensor-001", &admin, json!({"deviceId": "other"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "unknown_field");

    // Rotation gives a different token and records it.
    let (status, rotated) = server
        .post("/api/devices/sensor-001/token", &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let second_token = rotated["token"].as_str().unwrap();
    assert_ne!(second_token, first_token);
    assert_eq!(
        audit(&server, &admin, "action=device.rotate_token").await.len(),
        1
    );

    // Delete, then it is gone everywhere.
    let (status, _) = server.delete("/api/devices/sensor-001", &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = server.get("/api/devices/sensor-001", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = server.delete("/api/devices/sensor-001", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .post("/api/devices/sensor-001/token", &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The id can be registered again.
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
}

async fn bad_input_is_refused_and_writes_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;

    let raw_cases: &[(&str, u16, &str)] = &[
        (r#"{"deviceId": "sensor-002", "type": "#, 400, "invalid_json"),
        (r#"{deviceId: "sensor-002"}"#, 400, "invalid_json"),
        ("", 400, "invalid_json"),
        (r#"["sensor-002"]"#, 400, "invalid_type"),
    ];
    for (body, status, code) in raw_cases {
        let (got, response) = server
            .call_raw(Method::POST, "/api/devices/register", &admin, body)
            .await;
        assert_eq!(got.as_u16(), *status, "{body}: {response}");
        assert_eq!(response["error"]["code"], *code, "{body}: {response}");
    }

    let long_id = "x".repeat(129);
    let huge_metadata = json!({"blob": "x".repeat(20_000)});
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"type": "temperature"}), 400, "missing_field"),
        (json!({"deviceId": "sensor-002"}), 400, "missing_field"),
        (
            json!({"deviceId": 42, "type": "temperature"}),
            400,
            "invalid_type",
        ),
        (
            json!({"deviceId": "sensor-002", "type": "temperature", "metadata": "warehouse"}),
            400,
            "invalid_type",
        ),
        (
            json!({"deviceId": "sensor-002", "type": "temperature", "tags": "a,b"}),
            400,
            "invalid_type",
        ),
        (
            json!({"deviceId": long_id, "type": "temperature"}),
            400,
            "invalid_device_id",
        ),
        (
            json!({"deviceId": "a/b", "type": "temperature"}),
            400,
            "invalid_device_id",
        ),
        (
            json!({"deviceId": "sensor+#", "type": "temperature"}),
            400,
            "invalid_device_id",
        ),
        (
            json!({"deviceId": "", "type": "temperature"}),
            400,
            "invalid_device_id",
        ),
        (
            json!({"deviceId": "sensor-002", "type": ""}),
            400,
            "validation_failed",
        ),
        (
            json!({"deviceId": "sensor-002", "type": "t", "metadata": huge_metadata}),
            400,
            "validation_failed",
        ),
        (
            json!({"deviceId": "sensor-002", "type": "t", "tags": ["has space"]}),
            400,
            "validation_failed",
        ),
        (
            json!({"deviceId": "sensor-002", "type": "t", "groups": ["no-such-group"]}),
            404,
            "not_found",
        ),
        (
            json!({"deviceId": "sensor-001", "type": "temperature"}),
            409,
            "already_exists",
        ),
    ];
    for (body, status, code) in cases {
        let (got, response) = server.post("/api/devices/register", &admin, body.clone()).await;
        assert_eq!(got.as_u16(), status, "{body}: {response}");
        assert_eq!(response["error"]["code"], code, "{body}: {response}");
        assert!(
            response["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    // A body over the limit.
    let big = format!(
        r#"{{"deviceId": "sensor-003", "type": "t", "metadata": {{"x": "{}"}}}}"#,
        "y".repeat(2 * 1024 * 1024)
    );
    let (status, response) = server
        .call_raw(Method::POST, "/api/devices/register", &admin, &big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response["error"]["code"], "payload_too_large");

    // Patches that would break the limits are rolled back.
    let many: serde_json::Map<String, Value> = (0..70).map(|i| (format!("k{i}"), json!(i))).collect();
    let (status, _) = server
        .patch("/api/devices/sensor-001", &admin, json!({"metadata": many}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for chunk in 0..2 {
        let part: serde_json::Map<String, Value> =
            (0..40).map(|i| (format!("k{chunk}_{i}"), json!(i))).collect();
        let (status, body) = server
            .patch("/api/devices/sensor-001", &admin, json!({"metadata": part}))
            .await;
        assert_eq!(
            status,
            if chunk == 0 {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            },
            "{body}"
        );
    }
    let (_, device) = server.get("/api/devices/sensor-001", &admin).await;
    assert_eq!(
        device["metadata"].as_object().unwrap().len(),
        40,
        "the refused merge left nothing behind"
    );

    // Nothing was written by any refused request: one device, and only the accepted changes audited.
    let (_, list) = server.get("/api/devices", &admin).await;
    assert_eq!(ids(&list), ["sensor-001"]);
    assert_eq!(
        audit(&server, &admin, "action=device.register&outcome=ok")
            .await
            .len(),
        1
    );
    assert_eq!(
        audit(&server, &admin, "action=device.update&outcome=ok")
            .await
            .len(),
        1
    );
}

async fn tenants_are_isolated(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let platform = server.admin_token().await;
    let acme = server.tenant_admin(&platform, "acme").await;
    let globex = server.tenant_admin(&platform, "globex").await;
    let acme_key = server.api_key(&acme, "operator").await;
    let globex_key = server.api_key(&globex, "admin").await;

    server
        .register(
            &acme_key,
            json!({"deviceId": "sensor-001", "type": "temperature", "metadata": {"owner": "acme"}}),
        )
        .await;
    server
        .register(&acme_key, json!({"deviceId": "acme-only", "type": "temperature"}))
        .await;
    let (status, _) = server
        .post("/api/groups", &acme_key, json!({"name": "acme-group"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Globex sees none of it: 404, never 403, so ids cannot be probed.
    for path in [
        "/api/devices/acme-only",
        "/api/devices/sensor-001",
        "/api/groups/acme-group",
        "/api/groups/acme-group/members",
    ] {
        let (status, body) = server.get(path, &globex_key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (_, list) = server.get("/api/devices", &globex_key).await;
    assert_eq!(list["total"], 0);
    let (status, _) = server
        .patch("/api/devices/acme-only", &globex_key, json!({"type": "hijacked"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .post("/api/devices/acme-only/token", &globex_key, json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.delete("/api/devices/acme-only", &globex_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .post("/api/devices/acme-only/tags", &globex_key, json!({"tags": ["x"]}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, groups) = server.get("/api/groups", &globex_key).await;
    assert_eq!(groups["groups"], json!([]));

    // Globex's own group cannot take Acme's device.
    server
        .post("/api/groups", &globex_key, json!({"name": "g"}))
        .await;
    let (status, _) = server
        .post(
            "/api/groups/g/members",
            &globex_key,
            json!({"deviceIds": ["acme-only"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The same device id in another tenant is a different device.
    server
        .register(
            &globex_key,
            json!({"deviceId": "sensor-001", "type": "pump", "metadata": {"owner": "globex"}}),
        )
        .await;
    let (_, acme_device) = server.get("/api/devices/sensor-001", &acme_key).await;
    let (_, globex_device) = server.get("/api/devices/sensor-001", &globex_key).await;
    assert_eq!(acme_device["metadata"]["owner"], "acme");
    assert_eq!(globex_device["metadata"]["owner"], "globex");
    assert_eq!(globex_device["tenant"], "globex");

    // Nothing of Acme's changed.
    let (_, device) = server.get("/api/devices/acme-only", &acme_key).await;
    assert_eq!(device["type"], "temperature");
    let (_, list) = server.get("/api/devices", &acme_key).await;
    assert_eq!(list["total"], 2);

    // Tenant admins cannot switch tenants, read other tenants, or manage tenants.
    let response = server
        .client
        .get(server.url("/api/devices"))
        .bearer_auth(&globex)
        .header("X-Tenant-Id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let (status, _) = server.get("/api/tenants/acme", &globex).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.get("/api/tenants", &globex).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, users) = server.get("/api/users", &globex).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 1);

    // The platform admin can act inside a tenant explicitly.
    let response = server
        .client
        .get(server.url("/api/devices"))
        .bearer_auth(&platform)
        .header("X-Tenant-Id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["total"], 2);

    // Stats are per tenant.
    let (_, stats) = server.get("/stats", &globex_key).await;
    assert_eq!(stats["devices"]["registered"], 1);
    assert!(stats["platform"].is_null());

    // Denials are in the audit log of the tenant that tried (written in the background).
    common::eventually(
        std::time::Duration::from_secs(10),
        "tenant.switch denial audited",
        || async {
            audit(&server, &globex, "outcome=denied")
                .await
                .iter()
                .any(|e| e["action"] == "tenant.switch")
        },
    )
    .await;

    // A disabled tenant's credentials stop working.
    let (status, _) = server
        .patch("/api/tenants/globex", &platform, json!({"disabled": true}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get("/api/devices", &globex_key).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "globex-admin", "password": ADMIN_PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn roles_are_enforced(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let viewer_key = server.api_key(&admin, "viewer").await;
    let operator_key = server.api_key(&admin, "operator").await;
    let (status, _) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "vera", "password": "vera-password", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let viewer_user = server.login("vera", "vera-password").await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
    server.post("/api/groups", &admin, json!({"name": "g"})).await;

    for viewer in [&viewer_key, &viewer_user] {
        let writes: Vec<(Method, &str, Value)> = vec![
            (
                Method::POST,
                "/api/devices/register",
                json!({"deviceId": "sensor-002", "type": "t"}),
            ),
            (
                Method::PATCH,
                "/api/devices/sensor-001",
                json!({"type": "changed"}),
            ),
            (Method::DELETE, "/api/devices/sensor-001", Value::Null),
            (Method::POST, "/api/devices/sensor-001/token", json!({})),
            (
                Method::POST,
                "/api/devices/sensor-001/tags",
                json!({"tags": ["x"]}),
            ),
            (Method::POST, "/api/groups", json!({"name": "g2"})),
            (
                Method::POST,
                "/api/groups/g/members",
                json!({"deviceIds": ["sensor-001"]}),
            ),
            (Method::DELETE, "/api/groups/g", Value::Null),
            (Method::POST, "/api/keys", json!({"name": "k", "role": "viewer"})),
            (
                Method::POST,
                "/api/users",
                json!({"username": "x-user", "password": "password1", "role": "viewer"}),
            ),
            (Method::POST, "/api/tenants", json!({"id": "t", "name": "t"})),
        ];
        for (method, path, body) in writes {
            let body = (!body.is_null()).then_some(body);
            let (status, response) = server.call(method.clone(), path, Some(viewer), body).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {response}");
            assert_eq!(response["error"]["code"], "forbidden");
        }
        // Reads are allowed.
        for path in [
            "/api/devices",
            "/api/devices/sensor-001",
            "/api/groups",
            "/api/groups/g",
            "/stats",
        ] {
            let (status, body) = server.get(path, viewer).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
    }

    // Operators manage devices but not users, keys or the audit log.
    let (status, _) = server
        .patch(
            "/api/devices/sensor-001",
            &operator_key,
            json!({"type": "changed"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/api/users", "/api/keys", "/api/audit"] {
        let (status, _) = server.get(path, &operator_key).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }

    // Nothing the viewers tried was written.
    let (_, device) = server.get("/api/devices/sensor-001", &admin).await;
    assert_eq!(device["type"], "changed");
    assert_eq!(device["tags"], json!([]));
    let (_, list) = server.get("/api/devices", &admin).await;
    assert_eq!(list["total"], 1);
    let (_, group) = server.get("/api/groups/g", &admin).await;
    assert_eq!(group["memberCount"], 0);

    // Each refusal is in the audit log (written in the background).
    common::eventually(std::time::Duration::from_secs(10), "refusals audited", || async {
        let denied = audit(&server, &admin, "outcome=denied&limit=1000").await;
        denied.iter().filter(|e| e["action"] == "device.register").count() >= 2
            && denied.iter().any(|e| e["actor"] == "user:vera")
    })
    .await;
}

async fn expired_forged_and_missing_tokens_are_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let (_, me) = server.get("/api/auth/me", &admin).await;
    let user_id = me["id"].as_str().unwrap().to_string();
    let subject = || TokenSubject {
        user_id: &user_id,
        username: "admin",
        tenant: "default",
        role: Role::Admin,
        platform_admin: true,
        generation: 0,
    };

    let keys = JwtKeys::new(JWT_SECRET.as_bytes(), 3600, 60);
    let (expired, _) = keys.issue_at(subject(), Utc::now() - Duration::hours(2)).unwrap();
    let (status, body) = server.get("/api/devices", &expired).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "token_expired");

    // Within the clock skew an expired token still works.
    let (recent, _) = keys
        .issue_at(subject(), Utc::now() - Duration::seconds(3630))
        .unwrap();
    let (status, _) = server.get("/api/devices", &recent).await;
    assert_eq!(status, StatusCode::OK);

    let forger = JwtKeys::new(b"some-other-secret-some-other-secret-000", 3600, 60);
    let (forged, _) = forger.issue(subject()).unwrap();
    let (status, body) = server.get("/api/devices", &forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_token");

    // A valid token whose payload was edited (role escalation) fails the signature.
    let mut parts: Vec<String> = admin.split('.').map(String::from).collect();
    parts[1].insert(5, 'x');
    let (status, _) = server.get("/api/devices", &parts.join(".")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = server.get("/api/devices", "garbage").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_token");

    let (status, body) = server.call(Method::GET, "/api/devices", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthenticated");
    let response = server
        .client
        .get(server.url("/api/devices"))
        .header("Authorization", "Basic YWRtaW46YWRtaW4=")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));

    // Refusals are counted and audited platform-wide (repeats from one address as one entry
    // with a count).
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"drover_auth_failures_total{kind="token"}"#),
        "{metrics}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let entries = audit(&server, &admin, "scope=platform&outcome=denied&action=auth").await;
        if entries.iter().filter_map(|e| e["count"].as_u64()).sum::<u64>() >= 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "denials not audited: {entries:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn groups_and_members(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    for id in ["d1", "d2", "d3"] {
        server
            .register(&admin, json!({"deviceId": id, "type": "t"}))
            .await;
    }
    let (status, group) = server
        .post(
            "/api/groups",
            &admin,
            json!({"name": "warehouse-a", "description": "North"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(group["memberCount"], 0);
    let (status, body) = server
        .post("/api/groups", &admin, json!({"name": "warehouse-a"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "already_exists");
    let (status, body) = server
        .post("/api/groups", &admin, json!({"name": "bad name"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_group_name");

    // All or nothing: an unknown device adds none.
    let (status, body) = server
        .post(
            "/api/groups/warehouse-a/members",
            &admin,
            json!({"deviceIds": ["d1", "ghost"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].as_str().unwrap().contains("ghost"));
    let (_, group) = server.get("/api/groups/warehouse-a", &admin).await;
    assert_eq!(group["memberCount"], 0);

    let (status, group) = server
        .post(
            "/api/groups/warehouse-a/members",
            &admin,
            json!({"deviceIds": ["d1", "d2", "d1"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{group}");
    assert_eq!(group["memberCount"], 2);
    // Adding again is harmless.
    let (_, group) = server
        .post(
            "/api/groups/warehouse-a/members",
            &admin,
            json!({"deviceIds": ["d2", "d3"]}),
        )
        .await;
    assert_eq!(group["memberCount"], 3);

    let (_, members) = server
        .get("/api/groups/warehouse-a/members?limit=2", &admin)
        .await;
    assert_eq!(ids(&members), ["d1", "d2"]);
    assert_eq!(members["next"], "d2");
    let (_, device) = server.get("/api/devices/d1", &admin).await;
    assert_eq!(device["groups"], json!(["warehouse-a"]));

    let (status, group) = server.delete("/api/groups/warehouse-a/members/d1", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(group["memberCount"], 2);
    let (status, _) = server.delete("/api/groups/warehouse-a/members/d1", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, group) = server
        .patch("/api/groups/warehouse-a", &admin, json!({"description": "South"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(group["description"], "South");
    let (_, list) = server.get("/api/groups", &admin).await;
    assert_eq!(list["groups"][0]["memberCount"], 2);

    // Deleting a device removes it from its groups; deleting a group keeps its devices.
    server.delete("/api/devices/d2", &admin).await;
    let (_, group) = server.get("/api/groups/warehouse-a", &admin).await;
    assert_eq!(group["memberCount"], 1);
    let (status, _) = server.delete("/api/groups/warehouse-a", &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, device) = server.get("/api/devices/d3", &admin).await;
    assert_eq!(device["groups"], json!([]));
    let (status, _) = server.get("/api/groups/warehouse-a", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn users_and_password_rules(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let (_, me) = server.get("/api/auth/me", &admin).await;
    let admin_id = me["id"].as_str().unwrap().to_string();

    let (status, body) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "olga", "password": "short", "role": "operator"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, olga) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "olga", "password": "olga-password", "role": "operator"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!olga.to_string().contains("olga-password") && !olga.to_string().contains("argon2"));
    let (status, _) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "olga", "password": "olga-password", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let olga_id = olga["id"].as_str().unwrap().to_string();
    let olga_token = server.login("olga", "olga-password").await;

    // Users change their own password only with the current one, and nothing else of themselves.
    let path = format!("/api/users/{olga_id}");
    let (status, _) = server
        .patch(&path, &olga_token, json!({"password": "new-password"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server
        .patch(
            &path,
            &olga_token,
            json!({"password": "new-password", "currentPassword": "wrong"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.patch(&path, &olga_token, json!({"role": "admin"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server
        .patch(
            &path,
            &olga_token,
            json!({"password": "new-password", "currentPassword": "olga-password"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    server.login("olga", "new-password").await;

    // Only platform admins make platform admins.
    let tenant_admin = server.tenant_admin(&admin, "acme").await;
    let (status, _) = server.post("/api/users", &tenant_admin, json!({"username": "sneaky", "password": "sneaky-password", "role": "admin", "platformAdmin": true})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A disabled user cannot log in, and its token stops working.
    let (status, _) = server.patch(&path, &admin, json!({"disabled": true})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "olga", "password": "new-password"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "account_disabled");
    let (status, _) = server.get("/api/devices", &olga_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A role change applies to live tokens at once.
    let (_, viktor) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "viktor", "password": "viktor-password", "role": "operator"}),
        )
        .await;
    let viktor_token = server.login("viktor", "viktor-password").await;
    server
        .patch(
            &format!("/api/users/{}", viktor["id"].as_str().unwrap()),
            &admin,
            json!({"role": "viewer"}),
        )
        .await;
    let (status, _) = server
        .post(
            "/api/devices/register",
            &viktor_token,
            json!({"deviceId": "x", "type": "t"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The last active admin cannot be removed, demoted or disabled.
    let admin_path = format!("/api/users/{admin_id}");
    let (status, body) = server.delete(&admin_path, &admin).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = server.patch(&admin_path, &admin, json!({"role": "viewer"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = server.patch(&admin_path, &admin, json!({"disabled": true})).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Deleted users' tokens stop working.
    let (status, _) = server
        .delete(&format!("/api/users/{}", viktor["id"].as_str().unwrap()), &admin)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get("/api/devices", &viktor_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn failed_logins_lock_the_username(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |c| c.auth.max_failed_logins = 3) else {
        return;
    };
    for _ in 0..3 {
        let (status, _) = server
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({"username": "admin", "password": "guess-guess"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let response = server
        .client
        .post(server.url("/api/auth/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
}

async fn device_limit_is_enforced(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |c| c.limits.max_devices = 2) else {
        return;
    };
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "d1", "type": "t"}))
        .await;
    server
        .register(&admin, json!({"deviceId": "d2", "type": "t"}))
        .await;
    let (status, body) = server
        .post(
            "/api/devices/register",
            &admin,
            json!({"deviceId": "d3", "type": "t"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "limit_reached");
    assert!(body["error"]["message"].as_str().unwrap().contains("MAX_DEVICES"));
}

async fn registered_devices_are_found_through_their_supervisor(backend: Backend) {
    use drover_actors::device_actor::GetDeviceState;
    use drover_actors::{DeviceId, TenantId};

    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    server
        .register(
            &admin,
            json!({"deviceId": "sensor-001", "type": "temperature", "metadata": {"location": "warehouse-a"}}),
        )
        .await;
    let fleet = server.state.fleet.clone();
    let tenant = TenantId::parse("default").unwrap();
    let device = DeviceId::parse("sensor-001").unwrap();

    let actor = fleet
        .device(&tenant, &device)
        .await
        .unwrap()
        .expect("registered device has an actor");
    let state = actor.send(GetDeviceState {}).await.unwrap();
    let record = state.record.expect("state loaded from the registry");
    assert_eq!(record.device_type, "temperature");
    assert_eq!(record.metadata["location"], "warehouse-a");
    assert!(
        fleet
            .device(&tenant, &DeviceId::parse("ghost").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        fleet
            .device(&TenantId::parse("other").unwrap(), &device)
            .await
            .unwrap()
            .is_none()
    );

    let (status, actors) = server.get("/admin/actors", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(actors["tenants"][0]["devices"][0]["device"], "sensor-001");

    // Deleting the device stops its actor.
    server.delete("/api/devices/sensor-001", &admin).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while actor.connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "device actor still running after delete"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let tree = fleet.inspect().await;
    assert!(tree.iter().all(|t| t.devices.is_empty()));
}
