//! The agent session's gRPC stream: desired state down, heartbeats and
//! reports up. What a message means is `session`'s business; this
//! keeps the stream and ends it with the reason when a session is refused.

use std::pin::Pin;

use clawdeploy_proto::agent_session_server::AgentSession as AgentSessionRpc;
use clawdeploy_proto::{agent_message, AgentMessage, SchedulerMessage};
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
            let end = 'session: loop {
                let (messages, then) = match inbound.message().await {
                    Ok(Some(msg)) => next_messages(&mut inbound, msg),
                    Ok(None) => break "closed by agent".to_owned(),
                    Err(e) => break format!("stream error: {e}"),
                };
                for msg in messages {
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
                            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain)
                                .await;
                            break 'session format!("refused: {}", status.message());
                        }
                        tracing::warn!(node_id, error = %status.message(), "agent message not applied");
                    }
                }
                if let Some(end) = then {
                    break end;
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

/// `first` and every message already waiting behind it, with superseded
/// heartbeats dropped (`latest_heartbeats`), and why the stream ended if
/// it did meanwhile.
fn next_messages(
    inbound: &mut Streaming<AgentMessage>,
    first: AgentMessage,
) -> (Vec<AgentMessage>, Option<String>) {
    use futures::FutureExt;
    let mut messages = vec![first];
    let mut end = None;
    while let Some(next) = inbound.message().now_or_never() {
        match next {
            Ok(Some(msg)) => messages.push(msg),
            Ok(None) => {
                end = Some("closed by agent".to_owned());
                break;
            }
            Err(e) => {
                end = Some(format!("stream error: {e}"));
                break;
            }
        }
    }
    (latest_heartbeats(messages), end)
}

/// A heartbeat reports every container's current state, so of heartbeats
/// that queued up one after the other only the newest needs applying: an
/// agent reports on every change, and during a burst it reported faster
/// than the scheduler applied, each report waiting behind older ones.
/// Anything else keeps its place.
fn latest_heartbeats(messages: Vec<AgentMessage>) -> Vec<AgentMessage> {
    let is_beat = |m: &AgentMessage| matches!(m.msg, Some(agent_message::Msg::Heartbeat(_)));
    let mut kept: Vec<AgentMessage> = Vec::with_capacity(messages.len());
    for m in messages {
        if is_beat(&m) && kept.last().is_some_and(is_beat) {
            kept.pop();
        }
        kept.push(m);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawdeploy_proto::{Heartbeat, Hello};

    fn beat(generation: u64) -> AgentMessage {
        AgentMessage {
            msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                applied_generation: generation,
                ..Default::default()
            })),
        }
    }

    fn hello() -> AgentMessage {
        AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello::default())),
        }
    }

    fn generations(messages: &[AgentMessage]) -> Vec<Option<u64>> {
        messages
            .iter()
            .map(|m| match &m.msg {
                Some(agent_message::Msg::Heartbeat(h)) => Some(h.applied_generation),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn only_the_newest_of_queued_heartbeats_is_applied() {
        let kept = latest_heartbeats(vec![beat(1), beat(2), beat(3)]);
        assert_eq!(generations(&kept), vec![Some(3)]);
        // A hello keeps its place, and the heartbeats on either side of it
        // are not merged across it.
        let kept = latest_heartbeats(vec![beat(1), beat(2), hello(), beat(3), beat(4)]);
        assert_eq!(generations(&kept), vec![Some(2), None, Some(4)]);
        assert_eq!(generations(&latest_heartbeats(vec![hello()])), vec![None]);
    }
}
