//! A task enqueued at the moment the idle timeout fires is never lost: it either completes on this machine or
//! waits in its queue when the machine is gone.
//!
//! The 50 repetitions run the whole node agent (gate, supervisor, termination protocol) in this process with
//! `fake-clearml-worker` as its worker, behind a wrapper that accepts clearml-agent's `daemon` arguments. The
//! fake worker makes the same calls as clearml-agent's daemon loop (`queues.get_next_task`, `tasks.started`,
//! status reports, `tasks.completed`) and starts in milliseconds, which 50 real clearml-agent runs do not
//! (each takes seconds to start on two cores). A few repetitions then run with the real clearml-agent.
//!
//! Each repetition enqueues one task at a random moment, either shortly before the worker has been idle for
//! `max_idle`, or while the coordinator handles the termination request, with a random grant delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_node_agent::controller::Exit;
use fleet_tests::harness::wait_until;
use fleet_tests::node::{AgentOptions, NodeTestBed, TaskOutcome, WorkerProgram};
use rand::Rng;

const REPETITIONS: usize = 50;
/// Repetitions that run at the same time, each with its own emulator, coordinator and agent.
const PARALLEL: usize = 5;

/// When the task is enqueued, relative to the idle timeout.
#[derive(Debug, Clone, Copy)]
enum EnqueueMoment {
    /// This long before the worker has been idle for max_idle.
    BeforeTimeout(Duration),
    /// This long after the coordinator received the termination request.
    DuringRequest(Duration),
}

fn random_moment(rng: &mut impl Rng) -> EnqueueMoment {
    if rng.random_bool(0.5) {
        EnqueueMoment::BeforeTimeout(Duration::from_millis(rng.random_range(0..400)))
    } else {
        EnqueueMoment::DuringRequest(Duration::from_millis(rng.random_range(0..300)))
    }
}

/// Runs one repetition and returns where the task ended up.
async fn run_once(
    name: String,
    worker: WorkerProgram,
    max_idle_seconds: u32,
    moment: EnqueueMoment,
    grant_delay: Duration,
    task_script: Option<&str>,
) -> (TaskOutcome, usize) {
    let options = AgentOptions {
        max_idle_seconds,
        check_interval_ms: 50,
        worker,
        ..AgentOptions::default()
    };
    let bed = Arc::new(NodeTestBed::start(&name, options).await);
    let task_id = match task_script {
        Some(text) => {
            let path = bed.dir.join("task.py");
            std::fs::write(&path, text).unwrap();
            create_script_task(&bed, &path).await
        }
        None => bed.emulator.create_task("race-task", Some("node-race")),
    };
    bed.coordinator.set_grant_delay(grant_delay);

    let enqueued = Arc::new(AtomicBool::new(false));
    if let EnqueueMoment::DuringRequest(delay) = moment {
        let hook_bed = bed.clone();
        let hook_task = task_id.clone();
        let hook_enqueued = enqueued.clone();
        let fired = Arc::new(AtomicBool::new(false));
        bed.coordinator.set_hook(Some(Arc::new(move |_request| {
            if fired.swap(true, Ordering::SeqCst) {
                return;
            }
            let bed = hook_bed.clone();
            let task = hook_task.clone();
            let enqueued = hook_enqueued.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                bed.enqueue(&task).await;
                enqueued.store(true, Ordering::SeqCst);
            });
        })));
    }

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    if let EnqueueMoment::BeforeTimeout(early) = moment {
        wait_until(Duration::from_secs(60), "the worker to register", || {
            bed.emulator.workers().iter().any(|w| w.id == bed.worker_id)
        })
        .await
        .unwrap();
        let idle_timeout = Duration::from_secs(u64::from(max_idle_seconds));
        tokio::time::sleep(idle_timeout.saturating_sub(early)).await;
        bed.enqueue(&task_id).await;
        enqueued.store(true, Ordering::SeqCst);
    }

    let exit = agent.wait(Duration::from_secs(120)).await;
    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff, "{name}");
    // An enqueue scheduled after the grant may land once the agent is gone; the task must then wait in the queue.
    wait_until(
        Duration::from_secs(10),
        "the test to enqueue its task",
        || enqueued.load(Ordering::SeqCst),
    )
    .await
    .unwrap();
    (bed.task_outcome(&task_id), bed.shutdown_count())
}

async fn create_script_task(bed: &NodeTestBed, script: &std::path::Path) -> String {
    #[derive(serde::Deserialize)]
    struct Created {
        id: String,
    }
    let created: Created = bed
        .clearml()
        .call(
            "tasks.create",
            &serde_json::json!({
                "name": "race-task",
                "type": "training",
                "script": {"entry_point": script.display().to_string(), "working_dir": ".", "repository": ""},
            }),
            clearml_api::Retry::Never,
        )
        .await
        .unwrap();
    created.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_fake_worker_loses_no_task() {
    let binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_fake-clearml-worker"));
    let mut rng = rand::rng();
    let mut completed = 0;
    let mut queued = 0;

    for batch in 0..REPETITIONS.div_ceil(PARALLEL) {
        let mut runs = Vec::new();
        for slot in 0..PARALLEL {
            let index = batch * PARALLEL + slot;
            if index >= REPETITIONS {
                break;
            }
            let moment = random_moment(&mut rng);
            let grant_delay = Duration::from_millis(rng.random_range(0..200));
            let worker = WorkerProgram::FakeWorker {
                binary: binary.clone(),
                run_seconds: 0.2,
                poll_interval_ms: rng.random_range(20..120),
            };
            let name = format!("race_fake_{index}");
            runs.push(tokio::spawn(async move {
                let result = run_once(name.clone(), worker, 1, moment, grant_delay, None).await;
                (name, moment, grant_delay, result)
            }));
        }
        for run in runs {
            let (name, moment, grant_delay, (outcome, shutdowns)) = run.await.unwrap();
            assert_eq!(shutdowns, 1, "{name}: the shutdown action runs once");
            match outcome {
                TaskOutcome::Completed => completed += 1,
                TaskOutcome::Queued => queued += 1,
                TaskOutcome::Lost { status, in_queue } => panic!(
                    "{name}: task lost with status {status} (in queue: {in_queue}), enqueued {moment:?}, grant delay {grant_delay:?}"
                ),
            }
        }
    }

    eprintln!(
        "race with fake worker: {completed} tasks completed here, {queued} back in the queue"
    );
    assert_eq!(completed + queued, REPETITIONS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_real_clearml_agent_loses_no_task() {
    let moments = [
        EnqueueMoment::BeforeTimeout(Duration::from_millis(900)),
        EnqueueMoment::DuringRequest(Duration::ZERO),
        EnqueueMoment::BeforeTimeout(Duration::from_millis(450)),
        EnqueueMoment::DuringRequest(Duration::from_millis(150)),
    ];
    for (index, moment) in moments.into_iter().enumerate() {
        let name = format!("race_real_{index}");
        let (outcome, shutdowns) = run_once(
            name.clone(),
            WorkerProgram::ClearmlAgent,
            2,
            moment,
            Duration::from_millis(100),
            Some("print('race task ran')\n"),
        )
        .await;
        assert_eq!(shutdowns, 1, "{name}");
        assert!(
            matches!(outcome, TaskOutcome::Completed | TaskOutcome::Queued),
            "{name}: task lost: {outcome:?}, enqueued {moment:?}"
        );
        eprintln!("{name}: enqueued {moment:?} -> {outcome:?}");
    }
}
