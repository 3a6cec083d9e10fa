//! Events between schedulers over PostgreSQL `LISTEN/NOTIFY`. Two
//! schedulers serve one database; an agent or edge holds its stream with
//! one of them. A change made on the other (a claim for a node, a route, an
//! instance becoming ready) is announced here so the holder acts on it in
//! milliseconds instead of at the next heartbeat. This module is only the
//! transport; `background::peer_events` acts on what arrives.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;

const CHANNEL: &str = "clawdeploy_events";

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The node's desired state changed.
    Node(String),
    /// Route rows with these versions committed.
    Routes(Vec<u64>),
    /// The instance became ready.
    Ready(Uuid),
}

fn encode(origin: &str, events: &[Event]) -> String {
    let mut out = origin.to_owned();
    for e in events {
        out.push('\n');
        match e {
            Event::Node(id) => out.push_str(&format!("n {id}")),
            Event::Routes(v) => {
                let list: Vec<String> = v.iter().map(u64::to_string).collect();
                out.push_str(&format!("r {}", list.join(",")));
            }
            Event::Ready(id) => out.push_str(&format!("i {id}")),
        }
    }
    out
}

/// The events of a payload and the scheduler that sent it; unknown lines
/// are skipped (a newer scheduler may send more kinds).
fn decode(payload: &str) -> (&str, Vec<Event>) {
    let mut lines = payload.lines();
    let origin = lines.next().unwrap_or_default();
    let events = lines
        .filter_map(|l| {
            let (kind, arg) = l.split_once(' ')?;
            match kind {
                "n" => Some(Event::Node(arg.to_owned())),
                "r" => Some(Event::Routes(
                    arg.split(',').filter_map(|v| v.parse().ok()).collect(),
                )),
                "i" => arg.parse().ok().map(Event::Ready),
                _ => None,
            }
        })
        .collect();
    (origin, events)
}

/// Announces committed changes to the other schedulers. Best effort: the
/// heartbeat and the edges' reconnects catch up whatever is lost.
pub async fn publish(app: &App, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    let r = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(encode(&app.origin, events))
        .execute(&app.db)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "scheduler event not published");
    }
}

/// What the listener hands on.
#[derive(Debug)]
pub enum Incoming {
    /// Another scheduler's events.
    Events(Vec<Event>),
    /// The connection was lost: notifications sent meanwhile are gone.
    Gap,
}

/// Listens for the other schedulers' events until shutdown, handing each
/// payload (and each lost connection) to `on`.
pub async fn listen<F, Fut>(app: &App, mut shutdown: watch::Receiver<bool>, mut on: F)
where
    F: FnMut(Incoming) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let mut listener = match PgListener::connect_with(&app.db).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "event listener cannot connect; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(n) => {
                        let (origin, events) = decode(n.payload());
                        if origin != app.origin {
                            on(Incoming::Events(events)).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener lost its connection");
                        on(Incoming::Gap).await;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let id = Uuid::new_v4();
        let events = vec![
            Event::Node("node-a".into()),
            Event::Routes(vec![3, 17]),
            Event::Ready(id),
        ];
        let payload = encode("s1", &events);
        assert_eq!(decode(&payload), ("s1", events));
        assert_eq!(decode("s2\nx what\ni not-a-uuid").1, vec![]);
    }
}
