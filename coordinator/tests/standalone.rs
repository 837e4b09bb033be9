//! A standalone coordinator (`run --standalone`): local-process instances, records in a state file that
//! survive a SIGKILL of the coordinator, the HTTP endpoints, and gRPC over TLS with optional client
//! certificates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_proto::v1::fleet_service_client::FleetServiceClient;
use fleet_proto::v1::{GetClusterStatusRequest, ListInstancesRequest, WatchEventsRequest};
use fleet_tests::emulator::{Emulator, EmulatorConfig};
use fleet_tests::harness::{ChildProcess, LocalInstances, TestDir, free_port, wait_until_async};
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
const VIEWER_TOKEN: &str = "standalone-viewer-token";

/// Fields drop in declaration order: the reaper must run before the test directory is deleted.
struct Standalone {
    _reaper: LocalInstances,
    dir: TestDir,
    config: PathBuf,
    grpc: u16,
    http: u16,
    emulator: Emulator,
    queue_id: String,
    process: Option<ChildProcess>,
}

impl Standalone {
    async fn start(test: &str, tls: Option<&str>) -> Standalone {
        fleet_tests::node::init_test_logging();
        let dir = TestDir::new(test).unwrap();
        let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
            .await
            .unwrap();
        let queue_id = emulator.create_queue("default");
        let (grpc, http) = (free_port(), free_port());
        let instances = dir.join("instances");
        let text = format!(
            r#"[cluster]
name = "standalone-test"

[clearml]
api_server = "{clearml}"
poll_interval_seconds = 1

[defaults]
reconcile_interval_seconds = 1
orphan_grace_seconds = 5

[budget]
max_instances = 10

[api]
grpc_listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"
{tls}

[[api.tokens]]
name = "viewer"
role = "viewer"
token_env = "FLEET_VIEWER_TOKEN"

[local]
base_dir = "{instances}"
program = "/bin/sh"
args = ["-c", "exec sleep 600", "{{dir}}"]

[resources.box]
provider = "local"
max_instances = 10

[[queues]]
name = "default"
resources = ["box"]
max_instances = 10
"#,
            clearml = emulator.url(),
            instances = instances.display(),
            tls = tls.unwrap_or_default(),
        );
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, text).unwrap();
        let reaper = LocalInstances::new(instances.clone());
        let mut standalone = Standalone {
            _reaper: reaper,
            dir,
            config,
            grpc,
            http,
            emulator,
            queue_id,
            process: None,
        };
        standalone.spawn();
        standalone
    }

    fn spawn(&mut self) {
        let defaults = EmulatorConfig::default();
        let mut command = Command::new(BINARY);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--standalone")
            .arg("--state-file")
            .arg(self.dir.join("state.json"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,fleet_coordinator=debug")
            .env("CLEARML_API_ACCESS_KEY", &defaults.access_key)
            .env("CLEARML_API_SECRET_KEY", &defaults.secret_key)
            .env("FLEET_VIEWER_TOKEN", VIEWER_TOKEN);
        self.process = Some(ChildProcess::spawn("coordinator", command, self.dir.path()).unwrap());
    }

    fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|process| process.log_tail(40))
            .unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.http))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    async fn wait_ready(&self) {
        let ready = wait_until_async(
            Duration::from_secs(20),
            "the coordinator is ready",
            || async {
                self.get("/readyz")
                    .await
                    .is_some_and(|(status, _)| status == 200)
            },
        )
        .await;
        assert!(ready.is_ok(), "not ready\n{}", self.log());
    }

    async fn client(&self) -> FleetServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        FleetServiceClient::new(channel)
    }

    async fn instance_ids(&self) -> Vec<String> {
        let mut client = self.client().await;
        let mut ids: Vec<String> = client
            .list_instances(viewer(ListInstancesRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .instances
            .into_iter()
            .map(|instance| instance.instance_id)
            .collect();
        ids.sort();
        ids
    }

    fn instance_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.join("instances"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    async fn enqueue(&self, count: usize) {
        let client = self.emulator.client().unwrap();
        self.emulator
            .enqueue_new_tasks(&client, &self.queue_id, count)
            .await
            .unwrap();
    }
}

fn viewer<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER_TOKEN}").parse().unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_survives_sigkill_without_duplicates() {
    let mut standalone = Standalone::start("standalone-restart", None).await;
    standalone.wait_ready().await;
    let (status, body) = standalone.get("/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    standalone.enqueue(3).await;
    let launched = wait_until_async(
        Duration::from_secs(20),
        "three booting instances",
        || async {
            let ids = standalone.instance_ids().await;
            ids.len() == 3 && ids.iter().all(|id| !id.is_empty())
        },
    )
    .await;
    assert!(launched.is_ok(), "{}", standalone.log());
    let before = standalone.instance_ids().await;
    let (_, metrics) = standalone.get("/metrics").await.unwrap();
    assert!(metrics.contains("fleet_coordinator_leader 1"), "{metrics}");
    assert!(
        metrics.contains(r#"fleet_launches_total{queue="default",resource="box"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fleet_instances{queue="default",state="booting"} 3"#)
            || metrics.contains("# TYPE fleet_instances gauge"),
        "{metrics}"
    );

    // A crash and a restart on the same state file and instance directory: the records and the running
    // processes are found again, and nothing is launched twice.
    standalone.process.as_mut().unwrap().kill();
    standalone.spawn();
    standalone.wait_ready().await;
    let window = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < window {
        assert_eq!(
            standalone.instance_ids().await,
            before,
            "{}",
            standalone.log()
        );
        assert_eq!(
            standalone.instance_dirs(),
            3,
            "a process was launched twice"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut client = standalone.client().await;
    let mut events = client
        .watch_events(viewer(WatchEventsRequest {
            after_sequence: 0,
            follow: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut launched_events = 0;
    while let Some(event) = events.message().await.unwrap() {
        if event.kind == "instance.launched" {
            launched_events += 1;
        }
    }
    assert_eq!(launched_events, 3, "the event log survives the restart");
}

/// Makes a CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, with openssl.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // rustls accepts only X.509 v3 certificates, which openssl makes when extensions are given.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=fleet-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        let mut sign = vec![
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.pem"),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        sign.extend(["-extfile".to_owned(), format!("{name}.ext")]);
        run(&sign.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_optional_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let tls = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let standalone = Standalone::start("standalone-tls", Some(&tls)).await;
    standalone.wait_ready().await;

    let ca = Certificate::from_pem(std::fs::read(path("ca.pem")).unwrap());
    let endpoint = format!("https://127.0.0.1:{}", standalone.grpc);
    let server_only = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost");
    let with_identity = server_only.clone().identity(Identity::from_pem(
        std::fs::read(path("client.pem")).unwrap(),
        std::fs::read(path("client.key")).unwrap(),
    ));
    for tls in [server_only, with_identity] {
        let channel = Channel::from_shared(endpoint.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = FleetServiceClient::new(channel)
            .get_cluster_status(viewer(GetClusterStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.cluster, "standalone-test");
    }

    // Plain text to the TLS port fails.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", standalone.grpc))
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    let result = match plain {
        Ok(channel) => FleetServiceClient::new(channel)
            .get_cluster_status(viewer(GetClusterStatusRequest {}))
            .await
            .map(|_| ()),
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    assert!(
        result.is_err(),
        "a plain-text call to the TLS port succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_file_stops_with_exit_2() {
    let mut standalone = Standalone::start("standalone-corrupt", None).await;
    standalone.process.as_mut().unwrap().kill();
    std::fs::write(standalone.dir.join("state.json"), "{not json").unwrap();

    standalone.spawn();
    let process = standalone.process.as_mut().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = process.exit_status() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator kept running on a corrupt state file\n{}",
            process.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    assert_eq!(status.code(), Some(2), "{}", process.log_tail(20));
    let log = process.log_tail(20);
    assert!(log.contains("cannot load the records"), "{log}");
    assert!(log.contains("fix or delete the state file"), "{log}");
}
