//! `fleetctl` as a user runs it: the real binary against a real standalone coordinator with local-process
//! instances, and against a stand-in follower that points writes at that coordinator.

mod common;

use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use common::{OPERATOR_TOKEN, Output, Standalone, VIEWER_TOKEN, run_fleetctl};
use fleet_proto::v1::fleet_service_server::{FleetService, FleetServiceServer};
use fleet_proto::v1::{self};
use fleet_tests::harness::{free_port, wait_until_async};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

fn json(output: &Output) -> Value {
    assert_eq!(output.code, 0, "{output:?}");
    serde_json::from_str(&output.stdout)
        .unwrap_or_else(|err| panic!("stdout is not one JSON document: {err}\n{output:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_as_table_and_json() {
    let standalone = Standalone::start("fleetctl-reads").await;

    let status = standalone.fleetctl(Some(VIEWER_TOKEN), &["status"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status.stdout.contains("cluster        fleetctl-test"),
        "{status:?}"
    );
    assert!(
        status.stdout.contains("hourly budget  5.00 USD/h"),
        "{status:?}"
    );
    let status = json(
        &standalone
            .fleetctl(Some(VIEWER_TOKEN), &["status", "-o", "json"])
            .await,
    );
    assert_eq!(status["cluster"], "fleetctl-test");
    assert_eq!(status["hourly_budget_usd"], 5.0);
    assert!(status["term"].as_i64().unwrap() > 0, "{status}");

    standalone.enqueue(2).await;
    let ids = standalone.wait_for_instances(2).await;

    let queues = standalone.fleetctl(Some(VIEWER_TOKEN), &["queues"]).await;
    assert_eq!(queues.code, 0, "{queues:?}");
    // The local instances never register an agent, so both stay booting and both tasks keep waiting.
    assert_eq!(
        queues.stdout,
        "QUEUE    WAITING  DESIRED  INSTANCES  PAUSED  MIN  MAX  MIN-IDLE  MAX-IDLE-S\n\
         default        2        2  booting=2  no        0   10         0         300\n",
        "{queues:?}"
    );
    let queues = json(
        &standalone
            .fleetctl(Some(VIEWER_TOKEN), &["queues", "-o", "json"])
            .await,
    );
    let queue = &queues["queues"][0];
    assert_eq!(queue["name"], "default");
    assert_eq!(queue["paused"], false);
    assert_eq!(queue["limits"]["max_instances"], 10);

    // The table lists both instances in aligned columns: every row's STATE starts where the header's does.
    let table = standalone
        .fleetctl(Some(VIEWER_TOKEN), &["instances"])
        .await;
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{table:?}");
    let state_column = lines[0].find("STATE").expect("a STATE column");
    let mut listed_ids = Vec::new();
    for line in &lines[1..] {
        listed_ids.push(line.split_whitespace().next().unwrap().to_owned());
        assert!(line[state_column..].starts_with("booting "), "{table:?}");
        assert!(line.contains("  0.250  "), "{table:?}");
    }
    listed_ids.sort();
    assert_eq!(listed_ids, ids, "{table:?}");

    let listed = json(
        &standalone
            .fleetctl(
                Some(VIEWER_TOKEN),
                &["instances", "--queue", "default", "-o", "json"],
            )
            .await,
    );
    let instances = listed["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{listed}");
    assert_eq!(instances[0]["queue"], "default");
    assert_eq!(instances[0]["resource"], "box");
    assert_eq!(instances[0]["hourly_price_usd"], 0.25);
    let booting = json(
        &standalone
            .fleetctl(
                Some(VIEWER_TOKEN),
                &["instances", "--state", "booting,idle,busy", "-o", "json"],
            )
            .await,
    );
    assert_eq!(
        booting["instances"].as_array().unwrap().len(),
        2,
        "{booting}"
    );
    let terminated = standalone
        .fleetctl(Some(VIEWER_TOKEN), &["instances", "--state", "terminated"])
        .await;
    assert_eq!(terminated.code, 0, "{terminated:?}");
    assert_eq!(terminated.stdout, "no instances match\n");

    let events = standalone.fleetctl(Some(VIEWER_TOKEN), &["events"]).await;
    assert_eq!(events.code, 0, "{events:?}");
    assert!(events.stdout.starts_with("  SEQ  TIME"), "{events:?}");
    assert_eq!(
        events.stdout.matches("instance.launched").count(),
        2,
        "{events:?}"
    );
    let events = json(
        &standalone
            .fleetctl(Some(VIEWER_TOKEN), &["events", "-o", "json"])
            .await,
    );
    let events = events["events"].as_array().unwrap();
    let launched: Vec<&Value> = events
        .iter()
        .filter(|event| event["kind"] == "instance.launched")
        .collect();
    assert_eq!(launched.len(), 2, "{events:?}");
    let first = events[0]["sequence"].as_u64().unwrap();
    let later = json(
        &standalone
            .fleetctl(
                Some(VIEWER_TOKEN),
                &["events", "--after", &first.to_string(), "-o", "json"],
            )
            .await,
    );
    assert_eq!(
        later["events"].as_array().unwrap().len(),
        events.len() - 1,
        "{later}"
    );

    let plan = standalone
        .fleetctl(Some(VIEWER_TOKEN), &["dry-run", "default"])
        .await;
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.starts_with("ACTION  ") || plan.stdout.starts_with("no actions: "),
        "{plan:?}"
    );
    let plan = json(
        &standalone
            .fleetctl(Some(VIEWER_TOKEN), &["dry-run", "default", "-o", "json"])
            .await,
    );
    assert!(plan["actions"].is_array(), "{plan}");

    let unknown_queue = standalone
        .fleetctl(Some(VIEWER_TOKEN), &["dry-run", "gpu"])
        .await;
    assert_eq!(unknown_queue.code, 1, "{unknown_queue:?}");
    assert!(
        unknown_queue
            .stderr
            .contains(r#"queue "gpu" is not a configured queue"#),
        "{unknown_queue:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_errors_exit_3() {
    let standalone = Standalone::start("fleetctl-tokens").await;

    let missing = standalone.fleetctl(None, &["queues"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains("UNAUTHENTICATED"), "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("set FLEET_TOKEN or pass --token-file"),
        "{missing:?}"
    );

    let wrong = standalone
        .fleetctl(Some("not-a-configured-token"), &["queues"])
        .await;
    assert_eq!(wrong.code, 3, "{wrong:?}");
    assert!(
        wrong.stderr.contains("Check the token from FLEET_TOKEN"),
        "{wrong:?}"
    );
    assert!(
        !wrong.stderr.contains("not-a-configured-token"),
        "the token was printed: {wrong:?}"
    );

    let viewer_write = standalone
        .fleetctl(Some(VIEWER_TOKEN), &["pause", "default"])
        .await;
    assert_eq!(viewer_write.code, 3, "{viewer_write:?}");
    assert!(
        viewer_write.stderr.contains("PERMISSION_DENIED"),
        "{viewer_write:?}"
    );
    assert!(
        viewer_write.stderr.contains("operator token"),
        "{viewer_write:?}"
    );

    // A token file takes precedence over FLEET_TOKEN.
    let token_file = standalone.dir.join("operator.token");
    std::fs::write(&token_file, format!("{OPERATOR_TOKEN}\n")).unwrap();
    let token_file = token_file.display().to_string();
    let from_file = standalone
        .fleetctl(
            Some(VIEWER_TOKEN),
            &["--token-file", &token_file, "pause", "default"],
        )
        .await;
    assert_eq!(from_file.code, 0, "{from_file:?}");

    let absent_file = standalone
        .fleetctl(None, &["--token-file", "/nonexistent/token", "queues"])
        .await;
    assert_eq!(absent_file.code, 2, "{absent_file:?}");
    assert!(
        absent_file.stderr.contains("/nonexistent/token"),
        "{absent_file:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_change_queues_and_instances() {
    let standalone = Standalone::start("fleetctl-writes").await;
    let operator = Some(OPERATOR_TOKEN);

    let paused = standalone.fleetctl(operator, &["pause", "default"]).await;
    assert_eq!(paused.code, 0, "{paused:?}");
    assert!(
        paused.stdout.starts_with("queue default paused"),
        "{paused:?}"
    );
    let queues = json(
        &standalone
            .fleetctl(operator, &["queues", "-o", "json"])
            .await,
    );
    assert_eq!(queues["queues"][0]["paused"], true, "{queues}");
    let resumed = json(
        &standalone
            .fleetctl(operator, &["resume", "default", "-o", "json"])
            .await,
    );
    assert_eq!(resumed["name"], "default");
    assert_eq!(resumed["paused"], false, "{resumed}");

    let limited = json(
        &standalone
            .fleetctl(
                operator,
                &[
                    "limits",
                    "default",
                    "--max-instances",
                    "4",
                    "--min-idle",
                    "1",
                    "-o",
                    "json",
                ],
            )
            .await,
    );
    assert_eq!(limited["limits"]["max_instances"], 4, "{limited}");
    assert_eq!(limited["limits"]["min_idle"], 1, "{limited}");
    // A later call changes the limit it names and keeps the others.
    let raised = json(
        &standalone
            .fleetctl(
                operator,
                &["limits", "default", "--min-idle", "2", "-o", "json"],
            )
            .await,
    );
    assert_eq!(raised["limits"]["max_instances"], 4, "{raised}");
    assert_eq!(raised["limits"]["min_idle"], 2, "{raised}");
    let reset = json(
        &standalone
            .fleetctl(operator, &["limits", "default", "--reset", "-o", "json"])
            .await,
    );
    assert_eq!(reset["limits"]["max_instances"], 10, "{reset}");
    assert_eq!(reset["limits"]["min_idle"], 0, "{reset}");

    // A value the server rejects: exit 1 and the server's message, which names the field.
    let above_budget = standalone
        .fleetctl(operator, &["limits", "default", "--max-instances", "1000"])
        .await;
    assert_eq!(above_budget.code, 1, "{above_budget:?}");
    assert!(
        above_budget.stderr.contains("limits.max_instances = 1000"),
        "{above_budget:?}"
    );
    assert!(
        above_budget.stderr.contains("INVALID_ARGUMENT"),
        "{above_budget:?}"
    );
    // A value that is not a number: clap rejects it with exit 2 and names the flag.
    let negative = standalone
        .fleetctl(operator, &["limits", "default", "--min-idle=-3"])
        .await;
    assert_eq!(negative.code, 2, "{negative:?}");
    assert!(negative.stderr.contains("--min-idle"), "{negative:?}");
    let nothing = standalone.fleetctl(operator, &["limits", "default"]).await;
    assert_eq!(nothing.code, 2, "{nothing:?}");

    let unknown = standalone
        .fleetctl(operator, &["drain", "i-does-not-exist"])
        .await;
    assert_eq!(unknown.code, 4, "{unknown:?}");
    assert!(unknown.stderr.contains("i-does-not-exist"), "{unknown:?}");
    assert!(unknown.stderr.contains("fleetctl instances"), "{unknown:?}");

    standalone.enqueue(2).await;
    let ids = standalone.wait_for_instances(2).await;
    let drained = json(
        &standalone
            .fleetctl(operator, &["drain", &ids[0], "-o", "json"])
            .await,
    );
    assert_eq!(drained["instance"]["instance_id"], ids[0].as_str());
    assert_eq!(drained["instance"]["state"], "draining", "{drained}");

    let forced = standalone
        .fleetctl(operator, &["terminate", &ids[1], "--force"])
        .await;
    assert_eq!(forced.code, 0, "{forced:?}");
    assert!(
        forced
            .stdout
            .contains(&format!("termination of instance {}", ids[1])),
        "{forced:?}"
    );
    let terminated_listed = wait_until_async(
        Duration::from_secs(20),
        "the forced instance is listed as terminated",
        || async {
            let output = standalone
                .fleetctl(
                    operator,
                    &["instances", "--state", "terminated", "-o", "json"],
                )
                .await;
            serde_json::from_str::<Value>(&output.stdout).is_ok_and(|listed| {
                listed["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|instance| instance["instance_id"] == ids[1].as_str())
            })
        },
    )
    .await;
    assert!(terminated_listed.is_ok(), "{}", standalone.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_json_lines() {
    let standalone = Standalone::start("fleetctl-follow").await;
    let mut follower = tokio::process::Command::new(common::FLEETCTL)
        .args([
            "--endpoint",
            &standalone.endpoint(),
            "events",
            "--follow",
            "-o",
            "json",
        ])
        .env_clear()
        .env("FLEET_TOKEN", VIEWER_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();

    // Events stored while the stream is open arrive one JSON object per line.
    for queue_change in ["pause", "resume"] {
        let output = standalone
            .fleetctl(Some(OPERATOR_TOKEN), &[queue_change, "default"])
            .await;
        assert_eq!(output.code, 0, "{output:?}");
    }
    let mut overrides = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while overrides.len() < 2 {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("two queue.override events within 20 s")
            .unwrap()
            .expect("the stream stays open");
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("{err}: {line:?} is not one JSON object"));
        if event["kind"] == "queue.override" {
            overrides.push(event["message"].as_str().unwrap().to_owned());
        }
    }
    assert!(overrides[0].contains("paused"), "{overrides:?}");
    assert!(overrides[1].contains("resumed"), "{overrides:?}");
    follower.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_exits_5() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let output = run_fleetctl(
        Some(VIEWER_TOKEN),
        &[
            "--endpoint".into(),
            closed.clone(),
            "--timeout".into(),
            "2".into(),
            "status".into(),
        ],
    )
    .await;
    assert_eq!(output.code, 5, "{output:?}");
    assert!(output.stderr.contains(&closed), "{output:?}");
    assert!(output.stderr.contains("Connection refused"), "{output:?}");

    let not_a_url = run_fleetctl(
        Some(VIEWER_TOKEN),
        &[
            "--endpoint".into(),
            "127.0.0.1:7443".into(),
            "status".into(),
        ],
    )
    .await;
    assert_eq!(not_a_url.code, 2, "{not_a_url:?}");
    assert!(not_a_url.stderr.contains("127.0.0.1:7443"), "{not_a_url:?}");
}

/// A stand-in for a follower replica: it rejects every call with FAILED_PRECONDITION, with the leader's
/// address in `fleet-leader` when it has one.
#[derive(Clone)]
struct Follower {
    leader: Option<String>,
}

impl Follower {
    fn rejection<T>(&self) -> Result<Response<T>, Status> {
        let mut status = match &self.leader {
            Some(address) => Status::failed_precondition(format!(
                "replica follower is not the leader; send writes to the leader at {address}"
            )),
            None => Status::failed_precondition(
                "replica follower is not the leader and no leader is elected now; retry in a few seconds",
            ),
        };
        if let Some(address) = &self.leader {
            status
                .metadata_mut()
                .insert("fleet-leader", address.parse().unwrap());
        }
        Err(status)
    }

    /// Serves on a free port of 127.0.0.1 until the returned task is aborted, and returns its URL.
    async fn start(self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(FleetServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (url, task)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for Follower {
    async fn get_cluster_status(
        &self,
        _: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        self.rejection()
    }
    async fn list_queues(
        &self,
        _: Request<v1::ListQueuesRequest>,
    ) -> Result<Response<v1::ListQueuesResponse>, Status> {
        self.rejection()
    }
    async fn list_instances(
        &self,
        _: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        self.rejection()
    }
    type WatchEventsStream = EventStream;
    async fn watch_events(
        &self,
        _: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.rejection()
    }
    async fn drain_instance(
        &self,
        _: Request<v1::DrainInstanceRequest>,
    ) -> Result<Response<v1::InstanceActionResponse>, Status> {
        self.rejection()
    }
    async fn terminate_instance(
        &self,
        _: Request<v1::TerminateInstanceRequest>,
    ) -> Result<Response<v1::InstanceActionResponse>, Status> {
        self.rejection()
    }
    async fn pause_queue(
        &self,
        _: Request<v1::PauseQueueRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        self.rejection()
    }
    async fn resume_queue(
        &self,
        _: Request<v1::ResumeQueueRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        self.rejection()
    }
    async fn set_queue_limits(
        &self,
        _: Request<v1::SetQueueLimitsRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        self.rejection()
    }
    async fn dry_run(
        &self,
        _: Request<v1::DryRunRequest>,
    ) -> Result<Response<v1::DryRunResponse>, Status> {
        self.rejection()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_leader() {
    let standalone = Standalone::start("fleetctl-leader").await;
    let leader_address = format!("127.0.0.1:{}", standalone.grpc);
    let (follower, follower_task) = Follower {
        leader: Some(leader_address),
    }
    .start()
    .await;
    let (leaderless, leaderless_task) = Follower { leader: None }.start().await;
    let closed = format!("http://127.0.0.1:{}", free_port());

    // The follower names the leader, so the write lands there.
    let args = |endpoints: &[&str], command: &[&str]| -> Vec<String> {
        let mut args = Vec::new();
        for endpoint in endpoints {
            args.extend(["--endpoint".to_owned(), endpoint.to_string()]);
        }
        args.extend(command.iter().map(|arg| arg.to_string()));
        args
    };
    let paused = run_fleetctl(
        Some(OPERATOR_TOKEN),
        &args(&[&follower], &["pause", "default", "-o", "json"]),
    )
    .await;
    assert_eq!(json(&paused)["paused"], true, "{paused:?}");
    let queues = json(
        &standalone
            .fleetctl(Some(VIEWER_TOKEN), &["queues", "-o", "json"])
            .await,
    );
    assert_eq!(
        queues["queues"][0]["paused"], true,
        "the pause reached the leader: {queues}"
    );

    // A closed port and a follower without a leader are skipped for the next endpoint.
    let resumed = run_fleetctl(
        Some(OPERATOR_TOKEN),
        &args(
            &[&closed, &leaderless, &standalone.endpoint()],
            &["resume", "default", "-o", "json"],
        ),
    )
    .await;
    assert_eq!(json(&resumed)["paused"], false, "{resumed:?}");

    // With no leader anywhere, the command exits 5 with a message that no leader is elected.
    let no_leader = run_fleetctl(
        Some(OPERATOR_TOKEN),
        &args(&[&leaderless], &["pause", "default"]),
    )
    .await;
    assert_eq!(no_leader.code, 5, "{no_leader:?}");
    assert!(
        no_leader.stderr.contains("No leader is elected now"),
        "{no_leader:?}"
    );

    follower_task.abort();
    leaderless_task.abort();
}
