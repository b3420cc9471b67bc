//! Batch operations as jobs and dynamic groups end to end: a job over 1,000 devices, dry runs,
//! resuming after a restart, cancelling, rotated tokens handed out once, dynamic group
//! membership following the devices (metadata and the firmware a device reports over MQTT),
//! tenants, roles and bad input.

mod common;

use std::time::Duration;

use common::{Backend, TestServer, eventually};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

on_both_backends!(
    dynamic_groups_follow_the_devices_and_serve_as_batch_filters,
    jobs_respect_tenants_and_roles_tokens_go_once_to_their_creator_and_bad_input_is_refused,
);

/// Registers `count` devices `{prefix}-0000`… of `device_type`, 16 at a time.
async fn register_many(server: &TestServer, token: &str, prefix: &str, device_type: &str, count: usize) {
    futures_util::stream::iter(0..count)
        .map(|i| {
            let body = json!({"deviceId": format!("{prefix}-{i:04}"), "type": device_type,
                              "metadata": {"site": if i % 2 == 0 { "north" } else { "south" }}});
            async move { server.register(token, body).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// The ids of a group's devices, through the device list filter.
async fn members(server: &TestServer, admin: &str, group: &str) -> Vec<String> {
    let (status, body) = server.get(&format!("/api/devices?group={group}"), admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap().to_string())
        .collect()
}

async fn job(server: &TestServer, token: &str, id: &str) -> Value {
    let (status, body) = server.get(&format!("/api/jobs/{id}?limit=1000"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn wait_for_status(server: &TestServer, token: &str, id: &str, status: &str) -> Value {
    eventually(WAIT, &format!("job {id} {status}"), || async {
        job(server, token, id).await["status"] == status
    })
    .await;
    job(server, token, id).await
}

/// Every per-device result of a job, through the pages.
async fn all_results(server: &TestServer, token: &str, id: &str) -> Vec<Value> {
    let mut results = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/api/jobs/{id}?limit=300{after}");
        let (status, body) = server.get(&path, token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        results.extend(body["devices"].as_array().unwrap().iter().cloned());
        match body["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return results,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_over_1000_devices_gives_each_a_result_and_a_dry_run_touches_nothing() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    register_many(&server, &admin, "meter", "meter", 1000).await;
    server
        .register(&admin, json!({"deviceId": "pump-1", "type": "pump"}))
        .await;

    // Dry run: what would be touched, nothing created or changed.
    let (status, dry) = server
        .post(
            "/api/devices/batch?dryRun=true",
            &admin,
            json!({"operation": "add_tags", "filter": {"type": "meter", "site": "north"}, "params": {"tags": ["audited"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["dryRun"], true);
    assert_eq!(dry["total"], 500);
    assert_eq!(dry["devices"].as_array().unwrap().len(), 500);
    assert_eq!(dry["devices"][0], "meter-0000");
    assert_eq!(dry["truncated"], false);
    let (_, jobs) = server.get("/api/jobs", &admin).await;
    assert_eq!(
        jobs["jobs"].as_array().unwrap().len(),
        0,
        "a dry run creates no job"
    );
    let (_, tagged) = server.get("/api/devices?tag=audited", &admin).await;
    assert_eq!(tagged["total"], 0);

    let (status, created) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "add_tags", "filter": {"type": "meter"}, "params": {"tags": ["audited"]},
                   "concurrency": 32, "ratePerSec": 100000}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["total"], 1000);
    let id = created["id"].as_str().unwrap().to_string();
    let done = wait_for_status(&server, &admin, &id, "completed").await;
    assert_eq!(
        (
            done["succeeded"].as_u64(),
            done["failed"].as_u64(),
            done["pending"].as_u64()
        ),
        (Some(1000), Some(0), Some(0)),
        "{done}"
    );
    let results = all_results(&server, &admin, &id).await;
    assert_eq!(results.len(), 1000);
    assert!(
        results.iter().all(|r| r["status"] == "succeeded"),
        "every device succeeded"
    );
    let mut ids: Vec<&str> = results.iter().map(|r| r["deviceId"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "one result per device");
    let (_, tagged) = server.get("/api/devices?tag=audited&type=meter", &admin).await;
    assert_eq!(tagged["total"], 1000);
    let (_, pump) = server.get("/api/devices/pump-1", &admin).await;
    assert_eq!(
        pump["tags"],
        json!([]),
        "devices outside the filter are untouched"
    );
    let (_, failed) = server.get(&format!("/api/jobs/{id}?status=failed"), &admin).await;
    assert_eq!(failed["devices"], json!([]));

    // The job runner is in the actor tree with what it ran.
    let (status, tree) = server.get("/admin/actors", &admin).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let runner = &tree["jobRunner"];
    assert_eq!(runner["running"], json!([]), "{runner}");
    assert_eq!(runner["waiting"], json!([]), "{runner}");
    assert_eq!(runner["completed"], 1, "{runner}");
    assert_eq!(runner["devicesDone"], 1000, "{runner}");
    assert!(runner["maxRunning"].as_u64().unwrap() >= 1, "{runner}");

    // Other operations, each checked on a device.
    for (operation, params, check) in [
        ("set_metadata", json!({"metadata": {"owner": "ops"}}), "metadata"),
        ("unset_metadata", json!({"keys": ["site"]}), "metadata"),
        ("disable", Value::Null, "enabled"),
        ("enable", Value::Null, "enabled"),
        ("remove_tags", json!({"tags": ["audited"]}), "tags"),
    ] {
        let (status, created) = server
            .post(
                "/api/devices/batch",
                &admin,
                json!({"operation": operation, "filter": {"deviceIds": ["meter-0001", "meter-0002"]}, "params": params}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{operation}: {created}");
        let id = created["id"].as_str().unwrap().to_string();
        let done = wait_for_status(&server, &admin, &id, "completed").await;
        assert_eq!(done["succeeded"], 2, "{operation}: {done}");
        let (_, device) = server.get("/api/devices/meter-0001", &admin).await;
        match operation {
            "set_metadata" => assert_eq!(device[check]["owner"], "ops"),
            "unset_metadata" => assert!(device[check].get("site").is_none(), "{device}"),
            "disable" => assert_eq!(device[check], false),
            "enable" => assert_eq!(device[check], true),
            _ => assert_eq!(device[check], json!([])),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_after_a_restart_and_a_cancelled_job_stops() {
    let mut server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    register_many(&server, &admin, "slow", "slow", 150).await;
    let (status, created) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "set_metadata", "filter": {"type": "slow"}, "params": {"metadata": {"pass": 1}},
                   "concurrency": 2, "ratePerSec": 20}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    eventually(WAIT, "first results", || async {
        job(&server, &admin, &id).await["succeeded"].as_u64().unwrap() > 0
    })
    .await;
    let before = job(&server, &admin, &id).await;
    assert!(
        before["pending"].as_u64().unwrap() > 0,
        "still running when restarted: {before}"
    );
    server.restart();
    let admin = server.admin_token().await;
    let done = wait_for_status(&server, &admin, &id, "completed").await;
    assert_eq!(done["succeeded"], 150, "{done}");
    let results = all_results(&server, &admin, &id).await;
    assert_eq!(results.len(), 150);
    assert!(results.iter().all(|r| r["status"] == "succeeded"));
    assert!(
        done["succeeded"].as_u64() >= before["succeeded"].as_u64(),
        "results kept across the restart"
    );

    // Cancel: the job stops, devices not done are marked cancelled.
    let (status, created) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "add_tags", "filter": {"type": "slow"}, "params": {"tags": ["late"]},
                   "concurrency": 1, "ratePerSec": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (status, cancelled) = server
        .post(&format!("/api/jobs/{id}/cancel"), &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (status, again) = server
        .post(&format!("/api/jobs/{id}/cancel"), &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    eventually(WAIT, "the run noticed the cancel", || async {
        let (_, pending) = server
            .get(&format!("/api/jobs/{id}?status=pending"), &admin)
            .await;
        pending["devices"].as_array().unwrap().is_empty()
    })
    .await;
    let done = job(&server, &admin, &id).await;
    let cancelled_rows = all_results(&server, &admin, &id)
        .await
        .iter()
        .filter(|r| r["status"] == "cancelled")
        .count() as u64;
    assert!(cancelled_rows > 0, "{done}");
    assert_eq!(
        done["succeeded"].as_u64().unwrap() + cancelled_rows,
        150,
        "{done}"
    );
    let (_, tagged) = server.get("/api/devices?tag=late", &admin).await;
    assert_eq!(
        tagged["total"], done["succeeded"],
        "only the devices done before the cancel"
    );
}

async fn dynamic_groups_follow_the_devices_and_serve_as_batch_filters(backend: Backend) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let token = server
        .register(
            &admin,
            json!({"deviceId": "cam-1", "type": "camera", "metadata": {"site": "north"}}),
        )
        .await;
    server
        .register(
            &admin,
            json!({"deviceId": "cam-2", "type": "camera", "metadata": {"site": "south"}}),
        )
        .await;
    server
        .register(
            &admin,
            json!({"deviceId": "lamp-1", "type": "lamp", "metadata": {"site": "north"}}),
        )
        .await;
    let (status, group) = server
        .post(
            "/api/groups",
            &admin,
            json!({"name": "north-cams", "query": {"type": "camera", "metadata": {"site": "north"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{group}");
    assert_eq!(group["memberCount"], 1);
    assert_eq!(group["query"]["type"], "camera");
    assert_eq!(members(&server, &admin, "north-cams").await, ["cam-1"]);
    // cam-2 moves north: it is a member at once.
    let (status, _) = server
        .patch(
            "/api/devices/cam-2",
            &admin,
            json!({"metadata": {"site": "north"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(members(&server, &admin, "north-cams").await, ["cam-1", "cam-2"]);
    let (_, listed) = server.get("/api/groups/north-cams/members", &admin).await;
    assert_eq!(listed["total"], 2);
    // A dynamic group's members come from its query, not from additions.
    let (status, body) = server
        .post(
            "/api/groups/north-cams/members",
            &admin,
            json!({"deviceIds": ["lamp-1"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // By the firmware a device reports in its shadow.
    let (status, _) = server
        .post(
            "/api/groups",
            &admin,
            json!({"name": "fw-2", "query": {"firmware": "2.0.0"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(members(&server, &admin, "fw-2").await.is_empty());
    let mut options = rumqttc::MqttOptions::new("cam-1", "127.0.0.1", server.mqtt.port());
    options.set_credentials("cam-1", token);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
        .publish(
            "devices/cam-1/shadow/update",
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"firmware": "2.0.0"}}}).to_string(),
        )
        .await
        .unwrap();
    eventually(WAIT, "cam-1 in fw-2", || async {
        members(&server, &admin, "fw-2").await == ["cam-1"]
    })
    .await;
    let (_, by_firmware) = server.get("/api/devices?firmware=2.0.0", &admin).await;
    assert_eq!(by_firmware["total"], 1);

    // A batch job's filter takes a dynamic group.
    let (status, dry) = server
        .post(
            "/api/devices/batch?dryRun=true",
            &admin,
            json!({"operation": "enable", "filter": {"group": "north-cams"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["devices"], json!(["cam-1", "cam-2"]));
    // The query can change; the group cannot have a bad one.
    let (status, group) = server
        .patch(
            "/api/groups/north-cams",
            &admin,
            json!({"query": {"type": "lamp"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{group}");
    assert_eq!(members(&server, &admin, "north-cams").await, ["lamp-1"]);
    for query in [json!({}), json!({"status": "sleeping"}), json!({"colour": "red"})] {
        let (status, body) = server
            .post("/api/groups", &admin, json!({"name": "bad", "query": query}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
}

async fn jobs_respect_tenants_and_roles_tokens_go_once_to_their_creator_and_bad_input_is_refused(
    backend: Backend,
) {
    let Some(server) = TestServer::start(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let operator = server.api_key(&admin, "operator").await;
    let viewer = server.api_key(&admin, "viewer").await;
    let other = server.tenant_admin(&admin, "other").await;
    register_many(&server, &admin, "gw", "gateway", 3).await;

    let batch = json!({"operation": "rotate_tokens", "filter": {"type": "gateway"}});
    let (status, _) = server.post("/api/devices/batch", &viewer, batch.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, created) = server.post("/api/devices/batch", &operator, batch).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    wait_for_status(&server, &operator, &id, "completed").await;
    let (status, _) = server.get(&format!("/api/jobs/{id}"), &other).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another tenant does not see the job"
    );
    let (status, _) = server
        .post(&format!("/api/jobs/{id}/cancel"), &other, json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, others) = server.get("/api/jobs", &other).await;
    assert_eq!(others["jobs"], json!([]));
    let (status, listed) = server.get("/api/jobs", &viewer).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    let (status, _) = server
        .post(&format!("/api/jobs/{id}/cancel"), &viewer, json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let results = all_results(&server, &operator, &id).await;
    assert!(
        results.iter().all(|r| !r.to_string().contains("dvt_")),
        "results carry no token: {results:?}"
    );

    // The tokens: only to the caller that created the job, once.
    let (status, _) = server
        .post(&format!("/api/jobs/{id}/tokens"), &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, tokens) = server
        .post(&format!("/api/jobs/{id}/tokens"), &operator, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let tokens = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    let (_, again) = server
        .post(&format!("/api/jobs/{id}/tokens"), &operator, json!({}))
        .await;
    assert_eq!(again["tokens"], json!([]), "handed out once");
    // A new token works: the device logs in with it.
    let device = tokens[0]["deviceId"].as_str().unwrap();
    let token = tokens[0]["token"].as_str().unwrap();
    let response = server
        .client
        .post(server.url(&format!("/api/devices/{device}/telemetry")))
        .bearer_auth(token)
        .json(&json!({"metrics": {"t": 1}}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    for (body, query, code) in [
        (
            json!({"operation": "explode", "filter": {"all": true}}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "add_tags", "filter": {"all": true}}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "add_tags", "filter": {}, "params": {"tags": ["x"]}}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "add_tags", "filter": {"status": "asleep"}, "params": {"tags": ["x"]}}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "delete", "filter": {"all": true}, "concurrency": 0}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "delete", "filter": {"all": true}, "ratePerSec": 0}),
            "",
            "validation_failed",
        ),
        (
            json!({"operation": "delete", "filter": {"all": true}, "extra": 1}),
            "",
            "unknown_field",
        ),
        (
            json!({"operation": "delete", "filter": {"all": true}}),
            "?dryRun=maybe",
            "invalid_query",
        ),
        (
            json!({"operation": "delete", "filter": {"all": true}}),
            "?later=true",
            "invalid_query",
        ),
    ] {
        let (status, answer) = server
            .post(&format!("/api/devices/batch{query}"), &admin, body.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
    }
    let (status, answer) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "update_firmware", "filter": {"type": "sensor", "location": "warehouse-a"},
                   "params": {"version": "2.1.0", "url": "https://firmware.example.com/v2.1.0.bin"}}),
        )
        .await;
    // No image of that version yet: nothing is started.
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert!(
        answer["error"]["message"].as_str().unwrap().contains("2.1.0"),
        "{answer}"
    );
    // With the image uploaded, the batch starts an OTA campaign over the devices it selects.
    let uploaded = server
        .client
        .post(server.url("/api/firmware?version=2.1.0&deviceTypes=gateway&notes=batch"))
        .bearer_auth(&admin)
        .header("Content-Type", "application/octet-stream")
        .body(vec![7u8; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), StatusCode::CREATED);
    let (status, answer) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "update_firmware", "filter": {"type": "gateway"},
                   "params": {"version": "2.1.0", "rollout": {"stages": [50, 100]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let campaign = answer["detail"]["campaignId"]
        .as_str()
        .unwrap_or_else(|| panic!("a campaign id in {answer}"))
        .to_string();
    let (status, progress) = server.get(&format!("/api/campaigns/{campaign}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{progress}");
    let (status, answer) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "update_firmware", "filter": {"type": "gateway"},
                   "params": {"version": "2.1.0", "url": "https://firmware.example.com/v2.1.0.bin"}}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an unknown campaign field is refused: {answer}"
    );
    let (status, _) = server.get("/api/jobs/not-a-job", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.get(&format!("/api/jobs/{id}?status=weird"), &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Dynamic groups: a viewer reads them but neither defines nor changes one; another
    // tenant neither sees one nor selects devices with it.
    let query = json!({"name": "gateways", "query": {"type": "gateway"}});
    let (status, _) = server.post("/api/groups", &viewer, query.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, group) = server.post("/api/groups", &operator, query).await;
    assert_eq!(status, StatusCode::CREATED, "{group}");
    assert_eq!(group["memberCount"], 3, "{group}");
    let (status, _) = server
        .patch(
            "/api/groups/gateways",
            &viewer,
            json!({"query": {"type": "lamp"}}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, listed) = server.get("/api/groups/gateways/members", &viewer).await;
    assert_eq!(
        (status, listed["total"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{listed}"
    );
    for path in ["/api/groups/gateways", "/api/groups/gateways/members"] {
        let (status, body) = server.get(path, &other).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, _) = server
        .patch("/api/groups/gateways", &other, json!({"query": {"type": "lamp"}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = server.get("/api/devices?group=gateways", &other).await;
    assert_eq!(theirs["total"], 0, "{theirs}");
    let (status, dry) = server
        .post(
            "/api/devices/batch?dryRun=true",
            &other,
            json!({"operation": "add_tags", "filter": {"group": "gateways"}, "params": {"tags": ["x"]}}),
        )
        .await;
    assert!(
        status == StatusCode::NOT_FOUND || dry["total"] == 0,
        "another tenant's group selects nothing: {status} {dry}"
    );

    // Without credentials, none of the jobs', commands' or groups' endpoints answers.
    for (method, path) in [
        (Method::POST, "/api/devices/batch".to_string()),
        (Method::GET, "/api/jobs".into()),
        (Method::GET, format!("/api/jobs/{id}")),
        (Method::POST, format!("/api/jobs/{id}/cancel")),
        (Method::POST, format!("/api/jobs/{id}/tokens")),
        (Method::POST, "/api/devices/gw-0000/commands".into()),
        (Method::GET, "/api/devices/gw-0000/commands".into()),
        (Method::GET, "/api/commands/some-command".into()),
        (Method::POST, "/api/groups".into()),
        (Method::PATCH, "/api/groups/gateways".into()),
        (Method::GET, "/api/groups/gateways/members".into()),
    ] {
        let (status, body) = server.call(method.clone(), &path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
    }

    // Delete, last: the devices are gone and a later job over them has nothing to do.
    let (status, created) = server
        .post(
            "/api/devices/batch",
            &admin,
            json!({"operation": "delete", "filter": {"type": "gateway"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let done = wait_for_status(&server, &admin, created["id"].as_str().unwrap(), "completed").await;
    assert_eq!(done["succeeded"], 3, "{done}");
    let (_, left) = server.get("/api/devices?type=gateway", &admin).await;
    assert_eq!(left["total"], 0);
}
