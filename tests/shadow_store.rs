//! The registry's shadow store on SQLite and PostgreSQL (`DROVER_TEST_POSTGRES_URL`), and the
//! Redis cache in front of it (`DROVER_TEST_REDIS_URL`).

mod common;

use std::sync::Arc;

use chrono::Utc;
use common::{Backend, TestServer, service_url};
use drover::storage::shadows::CachedShadowStore;
use drover_actors::shadow::{ShadowLimits, apply_update, parse_update};
use drover_actors::{DeviceId, ShadowDocument, ShadowStore, ShadowStoreError, TenantId};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    saves_are_conditional_on_the_stored_version,
    concurrent_first_saves_have_exactly_one_winner,
    deleting_the_device_deletes_its_shadow,
    redis_cache_is_written_through_and_dropped_on_conflict,
);

fn ids(device: &str) -> (TenantId, DeviceId) {
    (
        TenantId::parse("default").unwrap(),
        DeviceId::parse(device).unwrap(),
    )
}

/// `current` with `update` applied.
fn next(current: Option<&ShadowDocument>, update: Value) -> ShadowDocument {
    let limits = ShadowLimits::default();
    let update = parse_update(update.to_string().as_bytes(), &limits).unwrap();
    apply_update(current, &update, Utc::now(), &limits)
        .unwrap()
        .document
}

async fn server_with_devices(backend: Backend, devices: &[&str]) -> Option<(TestServer, String)> {
    let server = TestServer::start(backend)?;
    let admin = server.admin_token().await;
    for id in devices {
        server
            .register(&admin, json!({"deviceId": id, "type": "lamp"}))
            .await;
    }
    Some((server, admin))
}

async fn saves_are_conditional_on_the_stored_version(backend: Backend) {
    let Some((server, _)) = server_with_devices(backend, &["lamp-1"]).await else {
        return;
    };
    let store = &server.state.registry;
    let (tenant, device) = ids("lamp-1");
    assert_eq!(store.load_shadow(&tenant, &device).await.unwrap(), None);

    let v1 = next(None, json!({"state": {"desired": {"on": true}}}));
    store.save_shadow(&tenant, &device, &v1, 0).await.unwrap();
    assert_eq!(
        store.load_shadow(&tenant, &device).await.unwrap(),
        Some(v1.clone())
    );
    // A second "first" save, and a save onto a version that is not the stored one, lose.
    assert_eq!(
        store.save_shadow(&tenant, &device, &v1, 0).await,
        Err(ShadowStoreError::Conflict)
    );
    let v2 = next(
        Some(&v1),
        json!({"state": {"reported": {"on": true, "list": [1, 2]}}}),
    );
    assert_eq!(
        store.save_shadow(&tenant, &device, &v2, 5).await,
        Err(ShadowStoreError::Conflict)
    );
    store.save_shadow(&tenant, &device, &v2, 1).await.unwrap();
    let loaded = store.load_shadow(&tenant, &device).await.unwrap().unwrap();
    assert_eq!(loaded, v2);
    assert_eq!(loaded.version, 2);
    assert_eq!(
        loaded.state_view()["reported"],
        json!({"on": true, "list": [1, 2]})
    );

    // Another tenant's device of the same id has no shadow.
    let other = TenantId::parse("other").unwrap();
    assert_eq!(store.load_shadow(&other, &device).await.unwrap(), None);
    // An unregistered device cannot get one.
    let ghost = DeviceId::parse("ghost").unwrap();
    assert!(matches!(
        store.save_shadow(&tenant, &ghost, &v1, 0).await,
        Err(ShadowStoreError::Unavailable(_))
    ));
}

async fn concurrent_first_saves_have_exactly_one_winner(backend: Backend) {
    let Some((server, _)) = server_with_devices(backend, &["lamp-1"]).await else {
        return;
    };
    let store = Arc::new(server.state.registry.clone());
    let (tenant, device) = ids("lamp-1");
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let (store, tenant, device) = (store.clone(), tenant.clone(), device.clone());
        tasks.push(tokio::spawn(async move {
            let doc = next(None, json!({"state": {"reported": {"writer": writer}}}));
            (writer, store.save_shadow(&tenant, &device, &doc, 0).await)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (writer, result) = task.await.unwrap();
        match result {
            Ok(()) => winners.push(writer),
            Err(error) => assert_eq!(error, ShadowStoreError::Conflict),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one first save wins: {winners:?}");
    let stored = store.load_shadow(&tenant, &device).await.unwrap().unwrap();
    assert_eq!(stored.state_view()["reported"]["writer"], winners[0]);

    // The same for concurrent saves onto version 1.
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let (store, tenant, device, base) = (store.clone(), tenant.clone(), device.clone(), stored.clone());
        tasks.push(tokio::spawn(async move {
            let doc = next(Some(&base), json!({"state": {"reported": {"second": writer}}}));
            store.save_shadow(&tenant, &device, &doc, 1).await
        }));
    }
    let mut won = 0;
    for task in tasks {
        if task.await.unwrap().is_ok() {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        store
            .load_shadow(&tenant, &device)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

async fn deleting_the_device_deletes_its_shadow(backend: Backend) {
    let Some((server, admin)) = server_with_devices(backend, &["lamp-1"]).await else {
        return;
    };
    let store = &server.state.registry;
    let (tenant, device) = ids("lamp-1");
    let v1 = next(None, json!({"state": {"desired": {"on": true}}}));
    store.save_shadow(&tenant, &device, &v1, 0).await.unwrap();
    let (status, _) = server.delete("/api/devices/lamp-1", &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(store.load_shadow(&tenant, &device).await.unwrap(), None);
    // Registered again under the same id, the device starts without a shadow.
    server
        .register(&admin, json!({"deviceId": "lamp-1", "type": "lamp"}))
        .await;
    let (status, body) = server.get("/api/devices/lamp-1/shadow", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

async fn redis_cache_is_written_through_and_dropped_on_conflict(backend: Backend) {
    let Some(url) = service_url("DROVER_TEST_REDIS_URL") else {
        return;
    };
    // A device id of its own, so runs sharing the Redis server never meet.
    let id = format!("lamp-{}", uuid::Uuid::new_v4().simple());
    let Some((server, _)) = server_with_devices(backend, &[&id]).await else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let database: Arc<dyn ShadowStore> = Arc::new(server.state.registry.clone());
    let cached = CachedShadowStore::new(database.clone(), client.clone(), "test");
    let (tenant, device) = ids(&id);
    let key = cached.key(&tenant, &device);
    assert!(key.starts_with("drover:test:shadow:"), "{key}");
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    let cached_text = |mut conn: redis::aio::MultiplexedConnection, key: String| async move {
        redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<String>>(&mut conn)
            .await
            .unwrap()
    };

    let v1 = next(None, json!({"state": {"desired": {"on": true}}}));
    cached.save_shadow(&tenant, &device, &v1, 0).await.unwrap();
    let text = cached_text(conn.clone(), key.clone())
        .await
        .expect("written through");
    assert_eq!(serde_json::from_str::<ShadowDocument>(&text).unwrap(), v1);
    assert_eq!(
        cached.load_shadow(&tenant, &device).await.unwrap(),
        Some(v1.clone())
    );

    // Another writer changes the database behind the cache: the next conditional save
    // conflicts and drops the stale copy, so the next load reads the database.
    let v2 = next(Some(&v1), json!({"state": {"reported": {"on": true}}}));
    database.save_shadow(&tenant, &device, &v2, 1).await.unwrap();
    assert_eq!(
        cached.save_shadow(&tenant, &device, &v2, 1).await,
        Err(ShadowStoreError::Conflict)
    );
    assert_eq!(cached_text(conn.clone(), key.clone()).await, None);
    assert_eq!(
        cached.load_shadow(&tenant, &device).await.unwrap(),
        Some(v2.clone())
    );
    assert!(
        cached_text(conn.clone(), key.clone()).await.is_some(),
        "a miss fills the cache"
    );

    cached.delete_shadow(&tenant, &device).await.unwrap();
    assert_eq!(cached_text(conn.clone(), key.clone()).await, None);
    assert_eq!(cached.load_shadow(&tenant, &device).await.unwrap(), None);
}
