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

/// PostgreSQL refuses a notification payload of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;
/// Route versions per line, so that no one line comes near the limit.
const VERSIONS_PER_LINE: usize = 200;

/// The payloads that carry `events` from `origin`: one line per event (a
/// long list of route versions over several), packed into as few payloads
/// as stay under PostgreSQL's limit.
fn encode(origin: &str, events: &[Event]) -> Vec<String> {
    let mut lines = Vec::new();
    for e in events {
        match e {
            Event::Node(id) => lines.push(format!("n {id}")),
            Event::Routes(v) => {
                for chunk in v.chunks(VERSIONS_PER_LINE) {
                    let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
                    lines.push(format!("r {}", list.join(",")));
                }
            }
            Event::Ready(id) => lines.push(format!("i {id}")),
        }
    }
    let mut payloads = Vec::new();
    let mut out = origin.to_owned();
    for line in lines {
        if out.len() + 1 + line.len() > MAX_PAYLOAD && out.len() > origin.len() {
            payloads.push(std::mem::replace(&mut out, origin.to_owned()));
        }
        out.push('\n');
        out.push_str(&line);
    }
    if out.len() > origin.len() {
        payloads.push(out);
    }
    payloads
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
    publish_over(app, &app.db, events).await
}

/// `publish` over `db` (the agents' own pool, on their reports' path).
pub async fn publish_over(app: &App, db: &sqlx::PgPool, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    for payload in encode(&app.origin, events) {
        let r = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(db)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "scheduler event not published");
        }
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
        let payloads = encode("s1", &events);
        assert_eq!(payloads.len(), 1);
        assert_eq!(decode(&payloads[0]), ("s1", events));
        assert_eq!(decode("s2\nx what\ni not-a-uuid").1, vec![]);
        assert!(encode("s1", &[]).is_empty());
    }

    #[test]
    fn a_burst_of_events_splits_under_the_payload_limit() {
        // A heartbeat that completes many claims: their routes and ready
        // instances, more than one notification holds.
        let ready: Vec<Uuid> = (0..400).map(|_| Uuid::new_v4()).collect();
        let mut events = vec![Event::Routes((1_000_000..1_000_900).collect())];
        events.extend(ready.iter().copied().map(Event::Ready));
        let payloads = encode("origin", &events);
        assert!(payloads.len() > 1);
        let mut versions = Vec::new();
        let mut readied = Vec::new();
        for p in &payloads {
            assert!(p.len() < 8000, "payload of {} bytes", p.len());
            let (origin, got) = decode(p);
            assert_eq!(origin, "origin");
            for e in got {
                match e {
                    Event::Routes(v) => versions.extend(v),
                    Event::Ready(id) => readied.push(id),
                    Event::Node(_) => panic!("no node event was sent"),
                }
            }
        }
        assert_eq!(versions, (1_000_000..1_000_900).collect::<Vec<u64>>());
        assert_eq!(readied, ready);
    }
}
