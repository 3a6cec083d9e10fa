//! The agent session's gRPC stream: desired state down, heartbeats and
//! reports up. What a message means is `session`'s business; this
//! keeps the stream and ends it with the reason when a session is refused.

use std::pin::Pin;

use clawdeploy_proto::agent_session_server::AgentSession as AgentSessionRpc;
use clawdeploy_proto::{AgentMessage, SchedulerMessage};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::identity::caller;
use super::session::AgentSession;
use crate::app::sessions::Outgoing;
use crate::app::AppRef;
use crate::crypto::pki::Identity;
use crate::error::Error;

pub struct AgentService {
    pub app: AppRef,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

fn to_item(o: Outgoing) -> Result<SchedulerMessage, Status> {
    match o {
        Outgoing::Message(m) => Ok(m),
        Outgoing::Refused(reason) => Err(Status::permission_denied(reason)),
    }
}

#[tonic::async_trait]
impl AgentSessionRpc for AgentService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let Identity::Node(node_id) = caller(&req)? else {
            return Err(Status::permission_denied(
                "only node certificates may open an agent session",
            ));
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let app = self.app.clone();
        tokio::spawn(async move {
            tracing::info!(node_id, "agent session opened");
            let mut session = AgentSession::new(app, node_id.clone(), tx.clone());
            let end = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = session.handle(msg).await {
                            let fatal = matches!(e, Error::Forbidden(_));
                            let status: Status = e.into();
                            if fatal {
                                let _ = tx
                                    .send(Outgoing::Refused(status.message().to_owned()))
                                    .await;
                                // Keep the request side open until the agent,
                                // having read the status, closes it: dropping
                                // it now can reset the stream before the
                                // status is flushed, and the agent would see
                                // a clean close instead of the reason.
                                let drain =
                                    async { while let Ok(Some(_)) = inbound.message().await {} };
                                let _ =
                                    tokio::time::timeout(std::time::Duration::from_secs(5), drain)
                                        .await;
                                break format!("refused: {}", status.message());
                            }
                            tracing::warn!(node_id, error = %status.message(), "agent message not applied");
                        }
                    }
                    Ok(None) => break "closed by agent".to_owned(),
                    Err(e) => break format!("stream error: {e}"),
                }
            };
            session.end();
            tracing::info!(node_id, reason = %end, "agent session ended");
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(to_item),
        )))
    }
}
