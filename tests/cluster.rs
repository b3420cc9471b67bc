//! Cluster mode end to end: three `drover` processes on 127.0.0.1 over the machine's PostgreSQL,
//! Redis and InfluxDB (one cluster for the whole file), with real MQTT clients.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{PgDatabase, service_url};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_drover");
const PASSWORD: &str = "cluster-admin-password-1";
const WAIT: Duration = Duration::from_secs(15);

struct Node {
    id: String,
    child: Child,
    http: String,
    mqtt_port: u16,
    _stderr: mpsc::Receiver<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log: Vec<String> = self._stderr.try_iter().collect();
            let start = log.len().saturating_sub(400);
            eprintln!("---- node {} log ----\n{}", self.id, log[start..].join("\n"));
        }
    }
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What the nodes of one cluster share.
struct Shared {
    pg: PgDatabase,
    influx: String,
    influx_db: String,
    redis: String,
    name: String,
    dir: tempfile::TempDir,
}

impl Shared {
    fn create() -> Option<Shared> {
        let redis = service_url("DROVER_TEST_REDIS_URL")?;
        Shared::create_with_redis(redis)
    }

    fn create_with_redis(redis: String) -> Option<Shared> {
        let pg = service_url("DROVER_TEST_POSTGRES_URL")?;
        let influx = service_url("DROVER_TEST_INFLUX_URL")?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Some(Shared {
            pg: PgDatabase::create(&pg),
            influx,
            influx_db: format!("drover_cluster_{}", &suffix[..12]),
            redis,
            name: format!("test-{}", &suffix[..12]),
            dir: tempfile::tempdir().unwrap(),
        })
    }

    fn start(&self, id: &str) -> Node {
        let data = self.dir.path().join(id);
        std::fs::create_dir_all(&data).unwrap();
        let mut child = Command::new(BINARY)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("HTTP_BIND", "127.0.0.1")
            .env("MQTT_PORT", "0")
            .env("MQTT_BIND", "127.0.0.1")
            .env("DATA_DIR", &data)
            .env("DATABASE_URL", &self.pg.url)
            .env("INFLUX_URL", &self.influx)
            .env("INFLUX_DB", &self.influx_db)
            .env("REDIS_URL", &self.redis)
            .env("CLUSTER_NAME", &self.name)
            .env("CLUSTER_NODE_ID", id)
            .env("CLUSTER_LEASE_SECS", "3")
            // Every node signs and checks logins with the same keys.
            .env("AUTH_KEY_FILE", self.dir.path().join("keys.json"))
            .env("DROVER_ADMIN_PASSWORD", PASSWORD)
            .env("HTTP_WORKERS", "1")
            .env("MQTT_WORKERS", "1")
            .env("ACTOR_THREADS", "1")
            .env("LOG_LEVEL", "info")
            .current_dir(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("drover starts");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let banner = loop {
            match stdout.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains("is running: console ") => break line,
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let errors: Vec<String> = stderr.try_iter().collect();
                    panic!("node {id} exited during start: {seen:?} {errors:?}");
                }
            }
            if Instant::now() > deadline {
                let errors: Vec<String> = stderr.try_iter().collect();
                panic!("node {id} did not start: {seen:?} {errors:?}");
            }
        };
        let api = banner.find("API http://").unwrap() + "API ".len();
        let http = banner[api..][..banner[api..].find("/api").unwrap()].to_string();
        let mqtt = banner.find(", MQTT ").unwrap() + ", MQTT ".len();
        let mqtt_addr: String = banner[mqtt..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        let mqtt_port = mqtt_addr
            .trim_end_matches(".")
            .rsplit_once(":")
            .unwrap()
            .1
            .parse()
            .unwrap();
        Node {
            id: id.to_string(),
            child,
            http,
            mqtt_port,
            _stderr: stderr,
        }
    }
}

/// What a cluster left in Redis (streams, persistent sessions with their 7-day TTLs) goes
/// with it.
impl Drop for Shared {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.redis.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("drover:{}:*", self.name))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

struct Api {
    client: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET /admin/cluster` on `node`.
    async fn cluster(&self, node: &Node, token: &str) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::GET,
            format!("{}/admin/cluster", node.http),
            Some(token),
            None,
        )
        .await
    }

    async fn login(&self, node: &Node) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                format!("{}/api/auth/login", node.http),
                None,
                Some(json!({"username": "admin", "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_string()
    }
}

/// A PUBLISH a client received: topic, payload, DUP flag.
type Received = (String, Vec<u8>, bool);

/// An MQTT client and its event loop, driven by a task that forwards what it receives.
struct Client {
    client: AsyncClient,
    received: tokio::sync::mpsc::UnboundedReceiver<Received>,
    events: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Packet ids of the PUBACKs it received.
    acks: tokio::sync::mpsc::UnboundedReceiver<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(port: u16, client_id: &str, user: &str, password: &str, clean: bool) -> (Client, bool) {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(user, password);
        options.set_clean_session(clean);
        Client::connect_with(options).await
    }

    async fn connect_with(mut options: MqttOptions) -> (Client, bool) {
        options.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (etx, events) = tokio::sync::mpsc::unbounded_channel();
        let (atx, acks) = tokio::sync::mpsc::unbounded_channel();
        let (ctx, crx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(drive(eventloop, tx, etx, atx, ctx));
        let present = tokio::time::timeout(WAIT, crx)
            .await
            .expect("CONNACK in time")
            .expect("connected");
        (
            Client {
                client,
                received,
                events,
                acks,
                task,
            },
            present,
        )
    }

    async fn next(&mut self) -> (String, Vec<u8>) {
        self.next_of("a message").await
    }

    async fn next_of(&mut self, what: &str) -> (String, Vec<u8>) {
        let (topic, payload, _) = self.next_publish(what).await;
        (topic, payload)
    }

    async fn next_publish(&mut self, what: &str) -> Received {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
            .expect("client running")
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    async fn publish_acked(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .unwrap_or_else(|_| panic!("PUBACK for {topic} in time"))
            .expect("client running");
    }

    /// Waits until the connection ends; returns how.
    async fn closed(&mut self) -> String {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("the connection closes in time")
            .unwrap_or_default()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 client asking for a session that outlives its connection by `expiry` seconds.
struct Client5 {
    client: rumqttc::v5::AsyncClient,
    received: tokio::sync::mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Client5 {
    async fn connect(port: u16, client_id: &str, user: &str, password: &str, expiry: u32) -> (Client5, bool) {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(user, password);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(expiry));
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (ctx, crx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connected = Some(ctx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(P5::ConnAck(ack))) => {
                        if let Some(c) = connected.take() {
                            let _ = c.send(ack.session_present);
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(P5::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).to_string();
                        let _ = tx.send((topic, p.payload.to_vec(), p.dup));
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let present = tokio::time::timeout(WAIT, crx)
            .await
            .expect("CONNACK in time")
            .expect("connected");
        (
            Client5 {
                client,
                received,
                task,
            },
            present,
        )
    }

    async fn next_of(&mut self, what: &str) -> Received {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
            .expect("client running")
    }

    /// Disconnects and waits until the connection is gone.
    async fn leave(self) {
        self.client.disconnect().await.unwrap();
        let mut task = self.task;
        let _ = tokio::time::timeout(WAIT, &mut task).await;
        task.abort();
    }
}

/// The topics of the next `n` messages, in order, and whether each had DUP set.
async fn topics(
    received: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
    n: usize,
    what: &str,
) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(WAIT, received.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: only {got:?} in time"))
            .expect("client running");
        got.push((next.0, next.2));
    }
    got
}

async fn drive(
    mut eventloop: EventLoop,
    tx: tokio::sync::mpsc::UnboundedSender<Received>,
    events: tokio::sync::mpsc::UnboundedSender<String>,
    acks: tokio::sync::mpsc::UnboundedSender<u16>,
    connected: tokio::sync::oneshot::Sender<bool>,
) {
    let mut connected = Some(connected);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if let Some(c) = connected.take() {
                    let _ = c.send(ack.session_present);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec(), p.dup));
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let _ = acks.send(ack.pkid);
            }
            Ok(Event::Incoming(Packet::Disconnect)) => {
                let _ = events.send("disconnect".into());
                return;
            }
            Ok(_) => {}
            Err(error) => {
                let _ = events.send(error.to_string());
                return;
            }
        }
    }
}

/// Waits until every node's route cache holds at least `filters` filters of node `from`.
async fn routes_reach(api: &Api, token: &str, nodes: &[&Node], from: &str, filters: u64) {
    let deadline = Instant::now() + WAIT;
    for node in nodes {
        loop {
            let (_, body) = api.cluster(node, token).await;
            if body["routes"]["remoteFilters"][from].as_u64().unwrap_or(0) >= filters {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "routes of {from} never reached {}: {body}",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_messages_and_hand_devices_over() {
    let Some(shared) = Shared::create() else { return };
    // The first node creates the registry, the admin and the shared keys; the others join it.
    let n1 = shared.start("n1");
    let n2 = shared.start("n2");
    let n3 = shared.start("n3");
    let api = Api {
        client: reqwest::Client::new(),
    };
    let token = api.login(&n1).await;
    // A login made on one node is good on the others (shared keys).
    let (status, body) = api.cluster(&n3, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = api.cluster(&n1, &token).await;
        let nodes: Vec<&str> = body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        if nodes == ["n1", "n2", "n3"] {
            assert_eq!(body["redis"], "up");
            break;
        }
        assert!(Instant::now() < deadline, "nodes never saw each other: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Viewers and tenant users do not see the cluster.
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            format!("{}/admin/cluster", n1.http),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = api
        .call(
            reqwest::Method::POST,
            format!("{}/api/keys", n1.http),
            Some(&token),
            Some(json!({"name": "app", "role": "operator"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = body["key"].as_str().unwrap().to_string();
    let mut devices = Vec::new();
    for id in ["d1", "d2", "d3"] {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                format!("{}/api/devices/register", n2.http),
                Some(&token),
                Some(json!({"deviceId": id, "type": "sensor"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        devices.push(body["token"].as_str().unwrap().to_string());
    }

    // ---- a subscriber on node 1 gets QoS 0/1/2 publishes made on nodes 2 and 3 -------------
    let (mut app, _) = Client::connect(n1.mqtt_port, "app-1", "app", &key, true).await;
    app.client.subscribe("plant/#", QoS::ExactlyOnce).await.unwrap();
    routes_reach(&api, &token, &[&n2, &n3], "n1", 1).await;
    let (pub2, _) = Client::connect(n2.mqtt_port, "app-2", "app", &key, true).await;
    let (pub3, _) = Client::connect(n3.mqtt_port, "app-3", "app", &key, true).await;
    let mut expected = Vec::new();
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        for (node, client) in [("n2", &pub2), ("n3", &pub3)] {
            let topic = format!("plant/{node}/q{i}");
            client
                .client
                .publish(&topic, qos, false, format!("from {node}"))
                .await
                .unwrap();
            expected.push(topic);
        }
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        got.push(app.next().await.0);
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected);

    // Retained on node 3, seen by a new subscriber on node 2.
    pub3.client
        .publish("plant/state", QoS::AtLeastOnce, true, "running")
        .await
        .unwrap();
    assert_eq!(app.next().await.0, "plant/state");
    let (mut late, _) = Client::connect(n2.mqtt_port, "app-late", "app", &key, true).await;
    late.client
        .subscribe("plant/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (topic, payload) = late.next().await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("plant/state", &b"running"[..])
    );

    // ---- a dashboard on node 1 sees telemetry of a device connected to node 3 -------------
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/ws?token={token}",
        n1.http.replace("http://", "ws://")
    ))
    .await
    .unwrap();
    assert_eq!(common::ws::next_json(&mut ws, WAIT).await["type"], "hello");
    let answer = common::ws::request(
        &mut ws,
        &json!({"type": "subscribe", "devices": "*"}).to_string(),
        WAIT,
    )
    .await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = api.cluster(&n3, &token).await;
        let watched = body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "n1" && n["watchedTenants"] == json!(["default"]));
        if watched {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never learnt that node 1 watches: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (d3, _) = Client::connect(n3.mqtt_port, "d3", "d3", &devices[2], true).await;
    d3.client
        .publish(
            "devices/d3/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"metrics": {"temperature": 21.5}}"#,
        )
        .await
        .unwrap();
    let frame = loop {
        let next = tokio::time::timeout(Duration::from_secs(8), common::ws::next_json(&mut ws, WAIT)).await;
        let Ok(frame) = next else {
            let (_, body) = api
                .call(reqwest::Method::GET, format!("{}/metrics", n3.http), None, None)
                .await;
            let text = body.as_str().unwrap_or_default().to_string();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && (l.contains("telemetry")
                            || l.contains("mqtt_messages")
                            || l.contains("refused")
                            || l.contains("dropped"))
                })
                .collect();
            panic!("no telemetry frame; node 3 metrics: {lines:#?}");
        };
        if frame["type"] == "telemetry" {
            break frame;
        }
    };
    assert_eq!(frame["deviceId"], "d3", "{frame}");
    assert_eq!(frame["messages"][0]["metrics"]["temperature"], 21.5, "{frame}");

    // A rule created through node 1 runs on node 3 (the device's owner), and the alarm it
    // opens there reaches the dashboard on node 1.
    let (status, rule) = api
        .call(
            reqwest::Method::POST,
            format!("{}/api/rules", n1.http),
            Some(&token),
            Some(
                json!({"name": "Hot", "severity": "major", "metric": "temperature",
                        "condition": "temperature > 30"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    let deadline = Instant::now() + WAIT;
    let alarm = 'alarm: loop {
        assert!(Instant::now() < deadline, "no alarm frame reached node 1");
        d3.client
            .publish(
                "devices/d3/telemetry",
                QoS::AtLeastOnce,
                false,
                r#"{"metrics": {"temperature": 40}}"#,
            )
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) =
                tokio::time::timeout(Duration::from_millis(100), futures_util::StreamExt::next(&mut ws))
                    .await
            else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "alarm" {
                break 'alarm frame;
            }
        }
    };
    assert_eq!(alarm["alarm"]["deviceId"], "d3", "{alarm}");
    assert_eq!(alarm["event"], "opened", "{alarm}");
    drop(ws);

    // ---- a device moves from node 1 to node 2 with its session and shadow ------------------
    let (mut d1, present) = Client::connect(n1.mqtt_port, "d1", "d1", &devices[0], false).await;
    assert!(!present);
    d1.client
        .subscribe("devices/d1/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    d1.client
        .subscribe("devices/d1/shadow/update/rejected", QoS::AtLeastOnce)
        .await
        .unwrap();
    routes_reach(&api, &token, &[&n3], "n1", 3).await;
    d1.client
        .publish(
            "devices/d1/shadow/update",
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"firmware": "1.0.0"}}}).to_string(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, shadow) = api
            .call(
                reqwest::Method::GET,
                format!("{}/api/devices/d1/shadow", n3.http),
                Some(&token),
                None,
            )
            .await;
        if shadow["state"]["reported"]["firmware"] == "1.0.0" {
            break;
        }
        if Instant::now() > deadline {
            let got: Vec<(String, String)> = std::iter::from_fn(|| d1.received.try_recv().ok())
                .map(|(t, p, _)| (t, String::from_utf8_lossy(&p).to_string()))
                .collect();
            panic!("reported state never stored: {shadow}; the device got {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A command published on node 3 while the device is connected to node 1.
    pub3.client
        .publish("devices/d1/commands/reboot", QoS::AtLeastOnce, false, "now")
        .await
        .unwrap();
    assert_eq!(
        d1.next_of("command on node 1").await.0,
        "devices/d1/commands/reboot"
    );

    // The same device connects to node 2: node 1 closes its connection, the session moves.
    let (mut d1_on_2, present) = Client::connect(n2.mqtt_port, "d1", "d1", &devices[0], false).await;
    assert!(present, "the session came along from node 1");
    let how = d1.closed().await;
    assert!(!how.is_empty(), "node 1 closed the old connection");
    // Routes follow the session (node 2 already held plant/state for the late subscriber).
    routes_reach(&api, &token, &[&n3], "n2", 2).await;
    pub3.client
        .publish("devices/d1/commands/update", QoS::AtLeastOnce, false, "v2")
        .await
        .unwrap();
    assert_eq!(
        d1_on_2.next_of("command after the move").await.0,
        "devices/d1/commands/update"
    );

    // Offline with a persistent session on node 2: a command queues there, and the device
    // finds it when it comes back on node 3.
    d1_on_2.client.disconnect().await.unwrap();
    let _ = d1_on_2.closed().await;
    pub3.client
        .publish("devices/d1/commands/queued", QoS::AtLeastOnce, false, "later")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut d1_on_3, present) = Client::connect(n3.mqtt_port, "d1", "d1", &devices[0], false).await;
    assert!(present);
    let (topic, payload) = d1_on_3.next_of("queued command").await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/d1/commands/queued", &b"later"[..])
    );
    let (_, shadow) = api
        .call(
            reqwest::Method::GET,
            format!("{}/api/devices/d1/shadow", n1.http),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(shadow["state"]["reported"]["firmware"], "1.0.0", "{shadow}");

    let (_, body) = api
        .call(reqwest::Method::GET, format!("{}/metrics", n3.http), None, None)
        .await;
    let metrics = body.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("drover_cluster_takeovers_total{direction=\"in\",how=\"handover\"} 1"),
        "{metrics}"
    );

    // Singletons: exactly one node drives the OTA campaigns.
    let redis = redis::Client::open(shared.redis.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let leader: Option<String> = redis::cmd("GET")
        .arg(format!("drover:{}:lease:campaign-runner", shared.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(leader.as_deref(), Some("n1" | "n2" | "n3")),
        "one node leads the campaign runner: {leader:?}"
    );

    // A token rotated through node 1 ends the device's connection on node 3 at once.
    let (mut d2, _) = Client::connect(n3.mqtt_port, "d2", "d2", &devices[1], true).await;
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            format!("{}/api/devices/d2/token", n1.http),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let how = d2.closed().await;
    assert!(!how.is_empty());
    let refused = MqttOptions::new("d2", "127.0.0.1", n3.mqtt_port);
    let mut refused = refused;
    refused.set_credentials("d2", &devices[1]);
    let (_client, mut events) = AsyncClient::new(refused, 4);
    let outcome = tokio::time::timeout(WAIT, events.poll())
        .await
        .expect("an answer");
    assert!(
        outcome.is_err(),
        "the old token is refused on every node: {outcome:?}"
    );

    // ---- an application's persistent session follows it from one live node to another -----
    let (mut roamer, _) = Client::connect(n1.mqtt_port, "roamer", "app", &key, false).await;
    roamer.client.subscribe("roam/#", QoS::AtLeastOnce).await.unwrap();
    routes_reach(&api, &token, &[&n3], "n1", 2).await;
    pub3.client
        .publish("roam/1", QoS::AtLeastOnce, false, "on n1")
        .await
        .unwrap();
    assert_eq!(roamer.next_of("a message on node 1").await.0, "roam/1");
    let (mut roamer_on_2, present) = Client::connect(n2.mqtt_port, "roamer", "app", &key, false).await;
    assert!(present, "node 1 handed the session over");
    assert!(
        !roamer.closed().await.is_empty(),
        "node 1 closed the old connection"
    );
    late.client
        .publish("roam/2", QoS::AtLeastOnce, false, "on n2")
        .await
        .unwrap();
    assert_eq!(
        roamer_on_2
            .next_of("a message after the move, no SUBSCRIBE")
            .await
            .0,
        "roam/2"
    );
    // Away from node 2: a message queues there, and comes along to node 3.
    roamer_on_2.client.disconnect().await.unwrap();
    let _ = roamer_on_2.closed().await;
    late.client
        .publish("roam/3", QoS::AtLeastOnce, false, "queued on n2")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut roamer_on_3, present) = Client::connect(n3.mqtt_port, "roamer", "app", &key, false).await;
    assert!(present);
    assert_eq!(
        roamer_on_3.next_of("the message queued on node 2").await.0,
        "roam/3"
    );
    drop((n1, n2, n3));
}

/// A Redis server of the test's own, to stop and start again.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Option<OwnRedis> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            assert!(
                std::env::var("DROVER_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "redis-server is not installed but DROVER_REQUIRE_SERVICES=1"
            );
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis { port, child: None };
        redis.resume();
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn health(api: &Api, node: &Node) -> (StatusCode, String) {
    let (status, body) = api
        .call(reqwest::Method::GET, format!("{}/health", node.http), None, None)
        .await;
    (status, body["status"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_outlive_a_redis_outage_and_rejoin_when_it_returns() {
    let Some(mut redis) = OwnRedis::start() else {
        return;
    };
    let Some(shared) = Shared::create_with_redis(redis.url()) else {
        return;
    };
    let mut n1 = shared.start("r1");
    let mut n2 = shared.start("r2");
    let api = Api {
        client: reqwest::Client::new(),
    };
    let token = api.login(&n1).await;
    let (_, body) = api
        .call(
            reqwest::Method::POST,
            format!("{}/api/keys", n1.http),
            Some(&token),
            Some(json!({"name": "app", "role": "operator"})),
        )
        .await;
    let key = body["key"].as_str().unwrap().to_string();
    let (mut app, _) = Client::connect(n1.mqtt_port, "watcher", "app", &key, true).await;
    app.client.subscribe("line/#", QoS::AtLeastOnce).await.unwrap();
    let (mut local, _) = Client::connect(n2.mqtt_port, "local", "app", &key, true).await;
    local.client.subscribe("line/#", QoS::AtLeastOnce).await.unwrap();
    // A persistent session, whose copy in Redis is lost with Redis's data.
    let (durable, _) = Client::connect(n1.mqtt_port, "durable", "app", &key, false).await;
    durable
        .client
        .subscribe("line/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let stored = redis::Client::open(redis.url().as_str()).unwrap();
    let session_key = format!("drover:{}:session:t:default:a:durable", shared.name);
    let session_stored = || async {
        let Ok(mut conn) = stored.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("HGET")
            .arg(&session_key)
            .arg("data")
            .query_async::<Option<String>>(&mut conn)
            .await
            .ok()
            .flatten()
            .is_some_and(|data| data.contains("line/#"))
    };
    let deadline = Instant::now() + WAIT;
    while !session_stored().await {
        assert!(
            Instant::now() < deadline,
            "the persistent session never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    routes_reach(&api, &token, &[&n2], "r1", 1).await;
    let (publisher, _) = Client::connect(n2.mqtt_port, "press", "app", &key, true).await;
    publisher
        .client
        .publish("line/1", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    assert_eq!(
        app.next_of("cross-node message before the outage").await.0,
        "line/1"
    );
    assert_eq!(local.next().await.0, "line/1");

    redis.stop();
    for node in [&n1, &n2] {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, state) = health(&api, node).await;
            if state == "degraded" {
                assert_eq!(status, StatusCode::OK, "a degraded node still serves");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never reported degraded: {state}",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The node keeps serving its own clients: local delivery goes on.
    publisher
        .client
        .publish("line/2", QoS::AtLeastOnce, false, "during")
        .await
        .unwrap();
    assert_eq!(local.next_of("local message during the outage").await.0, "line/2");
    tokio::time::sleep(Duration::from_secs(20)).await;
    for node in [&mut n1, &mut n2] {
        assert!(
            node.child.try_wait().unwrap().is_none(),
            "{} exited without Redis",
            node.id
        );
    }

    // Redis returns (empty): the nodes announce themselves and their routes again.
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        attempt += 1;
        publisher
            .client
            .publish("line/3", QoS::AtLeastOnce, false, format!("after {attempt}"))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(500), app.received.recv()).await {
            Ok(Some((topic, _, _))) if topic == "line/3" => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "cross-node delivery did not resume");
    }
    for node in [&n1, &n2] {
        let deadline = Instant::now() + WAIT;
        while health(&api, node).await.1 != "ok" {
            assert!(Instant::now() < deadline, "{} did not recover", node.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The node wrote its persistent session to the empty Redis again.
    let deadline = Instant::now() + WAIT;
    while !session_stored().await {
        assert!(
            Instant::now() < deadline,
            "the persistent session was not written again after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(durable);
}

/// One device publishing QoS 1 telemetry with a sequence number, one message in flight at a
/// time, moving to the next node when its node goes away. Returns the sequence numbers whose
/// PUBACK it received.
async fn ingest_until(
    device: String,
    token: String,
    ports: Vec<u16>,
    start_on: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<u64>, usize) {
    let mut acked = Vec::new();
    let mut seq = 0u64;
    let mut node = start_on;
    let mut moves = 0;
    let base_ts = chrono::Utc::now().timestamp_millis();
    'connect: while !*stop.borrow() {
        let mut options = MqttOptions::new(&device, "127.0.0.1", ports[node % ports.len()]);
        options.set_credentials(&device, &token);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 8);
        loop {
            if *stop.borrow() {
                break 'connect;
            }
            seq += 1;
            let payload = json!({"timestamp": base_ts + seq as i64, "metrics": {"seq": seq}}).to_string();
            if client
                .publish(
                    format!("devices/{device}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            })
            .await;
            if outcome == Ok(true) {
                acked.push(seq);
            } else {
                // The node is gone (or hung): the device moves on to the next one.
                node += 1;
                moves += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'connect;
            }
        }
    }
    (acked, moves)
}

/// kill -9 of a node: devices publishing QoS 1 telemetry lose no acknowledged point, and the
/// persistent sessions it held (MQTT 3.1.1 clean session 0, MQTT 5 session expiry) resume on
/// the other nodes with their subscriptions, the messages queued for them and those in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_ingestion_loses_no_acknowledged_point_nor_persistent_session() {
    let Some(shared) = Shared::create() else { return };
    let n1 = shared.start("k1");
    let n2 = shared.start("k2");
    let mut n3 = shared.start("k3");
    let api = Api {
        client: reqwest::Client::new(),
    };
    let token = api.login(&n1).await;

    // ---- persistent sessions on the node about to die (k3) ---------------------------------
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            format!("{}/api/keys", n1.http),
            Some(&token),
            Some(json!({"name": "orders", "role": "operator"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = body["key"].as_str().unwrap().to_string();
    // MQTT 3.1.1, clean session 0: subscribes, goes away.
    let (mut keeper, present) = Client::connect(n3.mqtt_port, "keeper", "app", &key, false).await;
    assert!(!present);
    keeper
        .client
        .subscribe("orders/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    // MQTT 5 with a session expiry of 10 minutes: the same.
    let (keeper5, present) = Client5::connect(n3.mqtt_port, "keeper5", "app", &key, 600).await;
    assert!(!present);
    keeper5
        .client
        .subscribe("orders/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    // Connected, taking messages without acknowledging them: they stay in flight.
    let mut holding = MqttOptions::new("holder", "127.0.0.1", n3.mqtt_port);
    holding.set_credentials("app", &key);
    holding.set_clean_session(false);
    holding.set_manual_acks(true);
    let (mut holder, _) = Client::connect_with(holding).await;
    holder
        .client
        .subscribe("orders/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    routes_reach(&api, &token, &[&n1], "k3", 1).await;
    keeper.client.disconnect().await.unwrap();
    let _ = keeper.closed().await;
    keeper5.leave().await;
    // The copies in Redis expire with the sessions: 600 s for MQTT 5, the configured maximum
    // (7 days) for MQTT 3.1.1.
    let redis = redis::Client::open(shared.redis.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    for (client, max) in [("keeper5", 600_000), ("keeper", 7 * 86_400_000)] {
        let key = format!("drover:{}:session:t:default:a:{client}", shared.name);
        let deadline = Instant::now() + WAIT;
        loop {
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
            // Until the disconnect is written the TTL still holds the connected margin.
            if ttl > 0 && ttl <= max {
                assert!(ttl > max - 60_000, "{client}: {ttl} ms");
                break;
            }
            assert!(Instant::now() < deadline, "{client}: TTL {ttl} ms");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Published on k1 and acknowledged to the publisher while the subscribers' node lives.
    let (mut orders, _) = Client::connect(n1.mqtt_port, "order-desk", "app", &key, true).await;
    for i in 1..=3 {
        orders.publish_acked(&format!("orders/{i}"), "new").await;
    }
    let in_flight = topics(&mut holder.received, 3, "messages in flight").await;
    assert!(in_flight.iter().all(|(_, dup)| !dup), "{in_flight:?}");
    let ports = vec![n1.mqtt_port, n2.mqtt_port, n3.mqtt_port];
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let id = format!("kd{i}");
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                format!("{}/api/devices/register", n1.http),
                Some(&token),
                Some(json!({"deviceId": id, "type": "meter"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let device_token = body["token"].as_str().unwrap().to_string();
        // Two devices on each node.
        tasks.push((
            id.clone(),
            tokio::spawn(ingest_until(
                id,
                device_token,
                ports.clone(),
                i % 3,
                stop_rx.clone(),
            )),
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    n3.child.kill().unwrap(); // SIGKILL
    n3.child.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = stop_tx.send(true);
    let mut results = Vec::new();
    for (id, task) in tasks {
        results.push((id, task.await.unwrap()));
    }
    // The devices of the killed node moved to the others and went on.
    for (id, (acked, moves)) in &results {
        assert!(acked.len() > 10, "{id} published too little: {}", acked.len());
        if id.ends_with('2') || id.ends_with('5') {
            assert!(*moves >= 1, "{id} was on the killed node and never moved");
        }
    }
    // Every acknowledged point is in InfluxDB.
    let influx = reqwest::Client::new();
    for (id, (acked, _)) in &results {
        let query = format!("SELECT \"seq\" FROM \"telemetry\" WHERE \"device\" = '{id}'");
        let body: Value = influx
            .get(format!("{}/query", shared.influx))
            .query(&[("db", shared.influx_db.as_str()), ("q", query.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let stored: std::collections::HashSet<u64> = body["results"][0]["series"][0]["values"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r[1].as_f64())
                    .map(|v| v as u64)
                    .collect()
            })
            .unwrap_or_default();
        let missing: Vec<&u64> = acked.iter().filter(|s| !stored.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{id}: acknowledged but not stored: {missing:?}"
        );
    }
    // ---- the persistent sessions of the killed node resume elsewhere -----------------------
    // Published after the others noticed the death, before the clients come back.
    let (_, body) = api.cluster(&n1, &token).await;
    assert_eq!(
        body["nodes"].as_array().map(Vec::len),
        Some(2),
        "k3 is gone: {body}"
    );
    orders.publish_acked("orders/late", "meanwhile").await;
    let expected: Vec<String> = ["orders/1", "orders/2", "orders/3", "orders/late"]
        .into_iter()
        .map(String::from)
        .collect();
    let (mut keeper, present) = Client::connect(n2.mqtt_port, "keeper", "app", &key, false).await;
    assert!(present, "the MQTT 3.1.1 session survived its node");
    let queued = topics(&mut keeper.received, 4, "queued for the 3.1.1 session").await;
    assert_eq!(
        queued.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        expected,
        "queued while it was away, in order"
    );
    let (mut keeper5, present) = Client5::connect(n1.mqtt_port, "keeper5", "app", &key, 600).await;
    assert!(present, "the MQTT 5 session survived its node");
    let mut queued5 = Vec::new();
    for _ in 0..4 {
        queued5.push(keeper5.next_of("queued for the MQTT 5 session").await.0);
    }
    assert_eq!(queued5, expected);
    let (mut holder, present) = Client::connect(n2.mqtt_port, "holder", "app", &key, false).await;
    assert!(present);
    let again = topics(&mut holder.received, 4, "in flight when the node died").await;
    assert_eq!(
        again,
        expected
            .iter()
            .map(|t| (t.clone(), t != "orders/late"))
            .collect::<Vec<_>>(),
        "unacknowledged messages come again, with DUP, then what was published meanwhile"
    );
    // Their subscriptions came along: a new order reaches all three without a SUBSCRIBE.
    routes_reach(&api, &token, &[&n1], "k2", 1).await;
    orders.publish_acked("orders/4", "after").await;
    assert_eq!(keeper.next_of("a new message, 3.1.1").await.0, "orders/4");
    assert_eq!(keeper5.next_of("a new message, MQTT 5").await.0, "orders/4");
    assert_eq!(
        holder.next_of("a new message, in flight before").await.0,
        "orders/4"
    );
    let (_, body) = api
        .call(reqwest::Method::GET, format!("{}/metrics", n2.http), None, None)
        .await;
    let metrics = body.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("drover_cluster_sessions_resumed_total{from=\"redis\"} 2"),
        "{metrics}"
    );

    // The killed node comes back under its id and rejoins.
    let n3 = shared.start("k3");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = api.cluster(&n3, &token).await;
        let count = body["nodes"].as_array().map_or(0, |n| n.len());
        if count == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node did not rejoin: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((n1, n2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_never_open_the_same_alarm_twice() {
    // Two nodes raising the same (rule, device) alarm at once share one PostgreSQL registry:
    // the database allows one active alarm, and the loser of the race updates it instead.
    let Some(server) = common::TestServer::start(common::Backend::Postgres) else {
        return;
    };
    let registry = server.state.registry.clone();
    let tenant = drover_actors::TenantId::parse("default").unwrap();
    let raises: Vec<_> = (0..8)
        .map(|i| {
            let registry = registry.clone();
            let tenant = tenant.clone();
            tokio::spawn(async move {
                registry
                    .raise_alarm(
                        tenant,
                        "rule-1".into(),
                        "too hot".into(),
                        "d1".into(),
                        drover_actors::rules::Severity::Major,
                        Some(f64::from(i)),
                        1,
                        json!({}),
                        1_800_000_000_000 + i64::from(i),
                        0,
                        None,
                    )
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for raise in raises {
        match raise.await.unwrap().expect("every raise lands") {
            drover::storage::rules::RaiseOutcome::Created { .. } => created += 1,
            drover::storage::rules::RaiseOutcome::Updated { .. } => {}
        }
    }
    assert_eq!(created, 1, "one alarm opened, the other raises updated it");
    let token = server.admin_token().await;
    let (status, body) = server.get("/api/alerts?deviceId=d1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let alarms = body["alerts"].as_array().cloned().unwrap_or_default();
    assert_eq!(alarms.len(), 1, "{body}");
    assert_eq!(alarms[0]["count"], 8, "{body}");
}

/// `node`'s `spanningRules` in `GET /admin/cluster`.
async fn spanning_view(api: &Api, node: &Node, token: &str) -> Value {
    api.cluster(node, token).await.1["spanningRules"].clone()
}

/// Waits until exactly one of `nodes` judges the tenant's group and absence rules and the
/// others know it; returns its index.
async fn spanning_holder(api: &Api, token: &str, nodes: &[&Node], tenant: &str) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut views = Vec::new();
        for node in nodes {
            views.push(spanning_view(api, node, token).await);
        }
        let judging: Vec<usize> = (0..nodes.len())
            .filter(|i| {
                views[*i]["judgedHere"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == tenant))
            })
            .collect();
        if let [holder] = judging[..]
            && views
                .iter()
                .all(|v| v["holders"][tenant] == nodes[holder].id.as_str())
        {
            return holder;
        }
        assert!(
            Instant::now() < deadline,
            "no single node judges the spanning rules: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Alarms of a rule (optionally of one device), active or not.
async fn alarms_of(api: &Api, node: &Node, token: &str, rule: &str, device: Option<&str>) -> Vec<Value> {
    let mut url = format!("{}/api/alerts?ruleId={rule}", node.http);
    if let Some(device) = device {
        url.push_str(&format!("&deviceId={device}"));
    }
    let (status, body) = api.call(reqwest::Method::GET, url, Some(token), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["alerts"].as_array().cloned().unwrap_or_default()
}

async fn publish_metrics(client: &Client, device: &str, metrics: Value) {
    client
        .client
        .publish(
            format!("devices/{device}/telemetry"),
            QoS::AtLeastOnce,
            false,
            json!({ "metrics": metrics }).to_string(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_absence_rules_span_the_nodes() {
    let Some(shared) = Shared::create() else { return };
    let n1 = shared.start("s1");
    let n2 = shared.start("s2");
    let n3 = shared.start("s3");
    let api = Api {
        client: reqwest::Client::new(),
    };
    let token = api.login(&n1).await;
    let mut tokens = std::collections::HashMap::new();
    for (id, kind) in [
        ("g1", "probe"),
        ("g2", "probe"),
        ("g3", "probe"),
        ("b1", "beacon"),
        ("b2", "beacon"),
    ] {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                format!("{}/api/devices/register", n1.http),
                Some(&token),
                Some(json!({"deviceId": id, "type": kind})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        tokens.insert(id, body["token"].as_str().unwrap().to_string());
    }
    let mut rule_ids = Vec::new();
    for rule in [
        json!({"name": "Hot everywhere", "severity": "major", "scope": {"type": "deviceType", "value": "probe"},
               "condition": {"type": "group", "expression": "temperature > 50", "minDevices": 3, "withinSecs": 60}}),
        json!({"name": "Beacon silent", "severity": "warning", "scope": {"type": "deviceType", "value": "beacon"},
               "condition": {"type": "absence", "forSecs": 3}}),
    ] {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                format!("{}/api/rules", n2.http),
                Some(&token),
                Some(rule),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        rule_ids.push(body["id"].as_str().unwrap().to_string());
    }
    let (group_rule, absence_rule) = (rule_ids[0].clone(), rule_ids[1].clone());
    let nodes = [&n1, &n2, &n3];
    let holder = spanning_holder(&api, &token, &nodes, "default").await;

    // ---- a group reached only by devices on three different nodes opens one alarm ----------
    let mut probes = Vec::new();
    for (id, node) in [("g1", &n1), ("g2", &n2), ("g3", &n3)] {
        let (client, _) = Client::connect(node.mqtt_port, id, id, &tokens[id], true).await;
        probes.push((id, client));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        for (id, client) in &probes {
            publish_metrics(client, id, json!({"temperature": 60})).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !alarms_of(&api, &n1, &token, &group_rule, None).await.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group rule never fired: {:?}",
            spanning_view(&api, nodes[holder], &token).await
        );
    }
    // It keeps holding on every node: still one alarm, whose repeats are counted.
    for _ in 0..5 {
        for (id, client) in &probes {
            publish_metrics(client, id, json!({"temperature": 61})).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let group_alarms = alarms_of(&api, &n1, &token, &group_rule, None).await;
    assert_eq!(group_alarms.len(), 1, "{group_alarms:?}");
    assert_eq!(group_alarms[0]["active"], true, "{group_alarms:?}");
    assert!(group_alarms[0]["count"].as_i64().unwrap() > 1, "{group_alarms:?}");
    drop(probes);

    // ---- a beacon moving from node 1 to node 2 is not absent; it is once it goes quiet ------
    let speak = |client: &Client| {
        let client = client.client.clone();
        async move {
            client
                .publish(
                    "devices/b1/telemetry",
                    QoS::AtLeastOnce,
                    false,
                    json!({"metrics": {"rssi": -60}}).to_string(),
                )
                .await
                .unwrap();
        }
    };
    let (beacon, _) = Client::connect(n1.mqtt_port, "b1", "b1", &tokens["b1"], true).await;
    for _ in 0..6 {
        speak(&beacon).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(beacon);
    let (beacon, _) = Client::connect(n2.mqtt_port, "b1", "b1", &tokens["b1"], true).await;
    // Twice the rule's duration on node 2: node 1 last heard of it long enough ago.
    for _ in 0..20 {
        speak(&beacon).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let absent = alarms_of(&api, &n1, &token, &absence_rule, Some("b1")).await;
    assert!(
        absent.is_empty(),
        "a beacon that moved was called absent: {absent:?}"
    );
    drop(beacon);
    let deadline = Instant::now() + WAIT;
    let absent = loop {
        let absent = alarms_of(&api, &n1, &token, &absence_rule, Some("b1")).await;
        if !absent.is_empty() {
            break absent;
        }
        assert!(
            Instant::now() < deadline,
            "a silent beacon was never called absent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let absent_now = alarms_of(&api, &n1, &token, &absence_rule, Some("b1")).await;
    assert_eq!(absent_now.len(), 1, "{absent:?} then {absent_now:?}");

    // ---- the lease moves when its node is killed, and the rules go on there ----------------
    let mut all = vec![n1, n2, n3];
    let mut killed = all.remove(holder);
    killed.child.kill().unwrap(); // SIGKILL
    killed.child.wait().unwrap();
    let survivors: Vec<&Node> = all.iter().collect();
    let token = api.login(survivors[0]).await;
    let new_holder = spanning_holder(&api, &token, &survivors, "default").await;
    assert_ne!(survivors[new_holder].id, killed.id);
    // The new holder's rule actor follows its lease on its next tick.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = survivors[1 - new_holder];
    let (beacon, _) = Client::connect(other.mqtt_port, "b2", "b2", &tokens["b2"], true).await;
    for _ in 0..3 {
        beacon
            .client
            .publish(
                "devices/b2/telemetry",
                QoS::AtLeastOnce,
                false,
                json!({"metrics": {"rssi": -70}}).to_string(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(beacon);
    let deadline = Instant::now() + WAIT;
    while alarms_of(&api, other, &token, &absence_rule, Some("b2"))
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "after the takeover a silent beacon was never called absent: {:?}",
            spanning_view(&api, survivors[new_holder], &token).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(killed);
}
