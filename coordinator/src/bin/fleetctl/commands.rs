//! One function per command: the call, then the output in the chosen format.

use std::time::Duration;

use fleet_proto::v1;
use serde_json::{Value, json};
use tonic::Status;
use tonic::codec::Streaming;

use crate::cli::{Cli, Command, Format, LimitsArgs};
use crate::connect::{
    Connection, EXIT_SERVER, EXIT_UNREACHABLE, Failure, describe_status, read_token,
};
use crate::render;

pub async fn run(cli: Cli) -> Result<(), Failure> {
    let (token, source) = read_token(cli.token_file.as_deref(), std::env::var("FLEET_TOKEN").ok())?;
    let connection = Connection::new(
        &cli.endpoints,
        token,
        source,
        cli.ca_file.as_deref(),
        Duration::from_secs(cli.timeout),
    )?;
    let format = cli.output;
    match cli.command {
        Command::Status => status(&connection, format).await,
        Command::Queues => queues(&connection, format).await,
        Command::Instances { queue, states } => {
            let request = v1::ListInstancesRequest {
                queue: queue.unwrap_or_default(),
                states: states.iter().map(|state| state.to_proto() as i32).collect(),
            };
            instances(&connection, format, request).await
        }
        Command::Events { after, follow } => events(&connection, format, after, follow).await,
        Command::Drain { id } => drain(&connection, format, id).await,
        Command::Terminate { id, force } => terminate(&connection, format, id, force).await,
        Command::Pause { queue } => pause(&connection, format, queue).await,
        Command::Resume { queue } => resume(&connection, format, queue).await,
        Command::Limits(args) => limits(&connection, format, args).await,
        Command::DryRun { queue } => dry_run(&connection, format, queue).await,
    }
}

fn print_json(value: &Value) {
    println!("{value:#}");
}

async fn status(connection: &Connection, format: Format) -> Result<(), Failure> {
    let (status, endpoint) = connection
        .call(
            "get cluster status",
            v1::GetClusterStatusRequest {},
            |mut client, request| async move { client.get_cluster_status(request).await },
        )
        .await?;
    match format {
        Format::Json => print_json(&render::status_json(&status)),
        Format::Table => print!("{}", render::status_table(&status, &endpoint)),
    }
    Ok(())
}

async fn queues(connection: &Connection, format: Format) -> Result<(), Failure> {
    let (response, _) = connection
        .call(
            "list queues",
            v1::ListQueuesRequest {},
            |mut client, request| async move { client.list_queues(request).await },
        )
        .await?;
    match format {
        Format::Json => print_json(&render::queues_json(&response.queues)),
        Format::Table => print!("{}", render::queues_table(&response.queues)),
    }
    Ok(())
}

async fn instances(
    connection: &Connection,
    format: Format,
    request: v1::ListInstancesRequest,
) -> Result<(), Failure> {
    let (response, _) = connection
        .call(
            "list instances",
            request,
            |mut client, request| async move { client.list_instances(request).await },
        )
        .await?;
    match format {
        Format::Json => print_json(&render::instances_json(&response.instances)),
        Format::Table => print!("{}", render::instances_table(&response.instances)),
    }
    Ok(())
}

async fn events(
    connection: &Connection,
    format: Format,
    after: u64,
    follow: bool,
) -> Result<(), Failure> {
    let what = if follow {
        "follow events"
    } else {
        "list events"
    };
    let request = v1::WatchEventsRequest {
        after_sequence: after,
        follow,
    };
    let (mut stream, endpoint) = connection
        .call(what, request, |mut client, request| async move {
            client.watch_events(request).await
        })
        .await?;

    if follow {
        return follow_events(connection, format, &mut stream, &endpoint, after).await;
    }

    // Without --follow the server ends the stream after the stored events, so reading them all is one
    // call and gets the same time limit.
    let mut events = Vec::new();
    let read_all = async {
        while let Some(event) = stream.message().await? {
            events.push(event);
        }
        Ok::<(), Status>(())
    };
    match tokio::time::timeout(connection.timeout, read_all).await {
        Ok(Ok(())) => {}
        Ok(Err(status)) => return Err(stream_failure(what, &endpoint, &status, after, &events)),
        Err(_) => {
            return Err(Failure {
                exit: EXIT_UNREACHABLE,
                message: format!(
                    "{what} failed on {endpoint}: the event log was not complete within {} s; raise \
                     --timeout or pass --after to read fewer events",
                    connection.timeout.as_secs()
                ),
            });
        }
    }
    match format {
        Format::Json => print_json(&json!({
            "events": events.iter().map(render::event_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            let mut table = render::events_table();
            for event in &events {
                table.push(render::event_cells(event));
            }
            if table.is_empty() {
                println!("no events after sequence {after}");
            } else {
                print!("{}", table.render());
            }
        }
    }
    Ok(())
}

/// Prints events as they arrive, one line each, until the stream ends or fails.
async fn follow_events(
    connection: &Connection,
    format: Format,
    stream: &mut Streaming<v1::Event>,
    endpoint: &str,
    after: u64,
) -> Result<(), Failure> {
    let table = render::events_table();
    if format == Format::Table {
        print!("{}", table.format_header());
    }
    let mut last = after;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(Failure {
                    exit: EXIT_UNREACHABLE,
                    message: format!(
                        "follow events: {endpoint} closed the stream after sequence {last}; run \
                         `fleetctl events --follow --after {last}` to go on"
                    ),
                });
            }
            Err(status) => {
                let failure = connection.status_failure("follow events", endpoint, &status);
                return Err(Failure {
                    exit: failure.exit.max(EXIT_SERVER),
                    message: format!(
                        "{}; the last event printed is sequence {last}, so run `fleetctl events --follow \
                         --after {last}` to go on",
                        failure.message
                    ),
                });
            }
        };
        last = event.sequence;
        match format {
            Format::Json => println!("{}", render::event_json(&event)),
            Format::Table => print!("{}", table.format_row(&render::event_cells(&event))),
        }
        // Each event is flushed at once, so a program reading from a pipe receives it without delay.
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

fn stream_failure(
    what: &str,
    endpoint: &str,
    status: &Status,
    after: u64,
    events: &[v1::Event],
) -> Failure {
    let last = events.last().map_or(after, |event| event.sequence);
    Failure {
        exit: EXIT_UNREACHABLE,
        message: format!(
            "{what} failed on {endpoint} after sequence {last}: {}; run the command again, with --after \
             {last} to skip the events already read",
            describe_status(status)
        ),
    }
}

fn print_instance_action(format: Format, response: &v1::InstanceActionResponse, summary: String) {
    let instance = response.instance.clone().unwrap_or_default();
    match format {
        Format::Json => print_json(&json!({ "instance": render::instance_json(&instance) })),
        Format::Table => {
            println!("{summary}");
            print!("{}", render::instances_table(&[instance]));
        }
    }
}

async fn drain(connection: &Connection, format: Format, id: String) -> Result<(), Failure> {
    let what = format!("drain instance {id:?}");
    let request = v1::DrainInstanceRequest {
        instance_id: id.clone(),
    };
    let (response, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.drain_instance(request).await
        })
        .await?;
    let summary = format!(
        "instance {id} is draining: it takes no new task and terminates when its task ends"
    );
    print_instance_action(format, &response, summary);
    Ok(())
}

async fn terminate(
    connection: &Connection,
    format: Format,
    id: String,
    force: bool,
) -> Result<(), Failure> {
    let what = format!("terminate instance {id:?}");
    let request = v1::TerminateInstanceRequest {
        instance_id: id.clone(),
        force,
    };
    let (response, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.terminate_instance(request).await
        })
        .await?;
    let summary = if force {
        format!(
            "termination of instance {id} sent to the cloud; it stops now, even with a task running"
        )
    } else {
        format!(
            "instance {id} is draining: it terminates when its task ends (use --force to terminate now)"
        )
    };
    print_instance_action(format, &response, summary);
    Ok(())
}

fn print_queue_change(format: Format, queue: &v1::QueueStatus, summary: String) {
    match format {
        Format::Json => print_json(&render::queue_json(queue)),
        Format::Table => {
            println!("{summary}");
            print!("{}", render::queues_table(std::slice::from_ref(queue)));
        }
    }
}

async fn pause(connection: &Connection, format: Format, queue: String) -> Result<(), Failure> {
    let what = format!("pause queue {queue:?}");
    let request = v1::PauseQueueRequest {
        queue: queue.clone(),
    };
    let (status, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.pause_queue(request).await
        })
        .await?;
    let summary = format!("queue {queue} paused: no launches until `fleetctl resume {queue}`");
    print_queue_change(format, &status, summary);
    Ok(())
}

async fn resume(connection: &Connection, format: Format, queue: String) -> Result<(), Failure> {
    let what = format!("resume queue {queue:?}");
    let request = v1::ResumeQueueRequest {
        queue: queue.clone(),
    };
    let (status, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.resume_queue(request).await
        })
        .await?;
    print_queue_change(format, &status, format!("queue {queue} resumed"));
    Ok(())
}

async fn limits(connection: &Connection, format: Format, args: LimitsArgs) -> Result<(), Failure> {
    let queue = args.queue;
    let what = format!("set limits of queue {queue:?}");
    let request = if args.reset {
        v1::SetQueueLimitsRequest {
            queue: queue.clone(),
            limits: None,
            reset: true,
        }
    } else {
        v1::SetQueueLimitsRequest {
            queue: queue.clone(),
            limits: Some(v1::QueueLimits {
                min_instances: args.min_instances,
                max_instances: args.max_instances,
                min_idle: args.min_idle,
                max_idle_seconds: args.max_idle_seconds,
            }),
            reset: false,
        }
    };
    let (status, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.set_queue_limits(request).await
        })
        .await?;
    let summary = if args.reset {
        format!("limits of queue {queue} reset to the configuration")
    } else {
        format!("limits of queue {queue} changed until `fleetctl limits {queue} --reset`")
    };
    print_queue_change(format, &status, summary);
    Ok(())
}

async fn dry_run(connection: &Connection, format: Format, queue: String) -> Result<(), Failure> {
    let what = format!("dry run of queue {queue:?}");
    let request = v1::DryRunRequest {
        queue: queue.clone(),
    };
    let (response, _) = connection
        .call(&what, request, |mut client, request| async move {
            client.dry_run(request).await
        })
        .await?;
    match format {
        Format::Json => print_json(&json!({
            "actions": response.actions.iter().map(render::action_json).collect::<Vec<_>>(),
        })),
        Format::Table => print!("{}", render::dry_run_table(&queue, &response.actions)),
    }
    Ok(())
}
