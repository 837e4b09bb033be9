//! The NodeAgent gRPC service for the coordinator and operators.

use std::pin::Pin;
use std::sync::Arc;

use fleet_proto::v1::node_agent_server::NodeAgent;
use fleet_proto::v1::{
    DrainRequest, DrainResponse, LogLine, NodeStatus, NodeStatusRequest, ShutdownRequest,
    ShutdownResponse, TailLogsRequest,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::controller::{Agent, Command, agent_state};

/// Lines TailLogs returns when the request sets `lines` to 0.
const DEFAULT_TAIL_LINES: usize = 100;

/// The NodeAgent service implementation.
///
/// NOTE: it checks no credentials and serves plain HTTP/2, so `agent.grpc_listen` must stay on a private
/// address until the coordinator's client certificates are wired in.
pub struct NodeAgentService {
    agent: Arc<Agent>,
    commands: mpsc::Sender<Command>,
}

impl NodeAgentService {
    pub fn new(agent: Arc<Agent>, commands: mpsc::Sender<Command>) -> NodeAgentService {
        NodeAgentService { agent, commands }
    }

    async fn send(&self, command: Command) -> Result<(), Status> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))
    }
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    async fn status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let agent = &self.agent;
        let child = agent.supervisor.status();
        let snapshot = agent.gate.snapshot();
        Ok(Response::new(NodeStatus {
            instance_id: agent.instance_id.clone(),
            worker_id: agent.worker_id.clone(),
            state: agent_state(&agent.gate, &child) as i32,
            task_id: snapshot.held.map(|t| t.task_id).unwrap_or_default(),
            idle_since_unix_ms: snapshot.idle_since_unix_ms,
            clearml_agent_restarts: child.restarts,
            uptime_seconds: agent.started_at.elapsed().as_secs(),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Drain {
            reason: request.into_inner().reason,
            reply,
        })
        .await?;
        let running = answer
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        Ok(Response::new(DrainResponse {
            running_task_id: running.unwrap_or_default(),
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let request = request.into_inner();
        self.send(Command::Shutdown {
            reason: request.reason,
            requeue_running_task: request.requeue_running_task,
        })
        .await?;
        Ok(Response::new(ShutdownResponse {}))
    }

    type TailLogsStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

    async fn tail_logs(
        &self,
        request: Request<TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        let request = request.into_inner();
        let count = if request.lines == 0 {
            DEFAULT_TAIL_LINES
        } else {
            request.lines as usize
        };
        let logs = self.agent.logs.clone();
        // Subscribe before reading the tail, so no line falls between the two.
        let mut follow = request.follow.then(|| logs.subscribe());
        let tail = logs.tail(count);
        let (sender, receiver) = mpsc::channel(64);

        tokio::spawn(async move {
            for line in tail {
                if sender.send(Ok(line)).await.is_err() {
                    return;
                }
            }
            let Some(follow) = follow.as_mut() else {
                return;
            };
            loop {
                let item = match follow.recv().await {
                    Ok(line) => Ok(line),
                    Err(broadcast::error::RecvError::Lagged(skipped)) => Ok(LogLine {
                        unix_ms: crate::unix_ms_now(),
                        stream: "stderr".to_owned(),
                        line: format!(
                            "[fleet-node-agent: {skipped} lines skipped because the reader was slow]"
                        ),
                    }),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sender.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
