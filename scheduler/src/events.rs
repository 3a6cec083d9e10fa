//! Events between schedulers over PostgreSQL `LISTEN/NOTIFY`. Two
//! schedulers serve one database; an agent or edge holds its stream with
//! one of them. A change made on the other (a claim for a node, a route, an
//! instance becoming ready) is announced here so the holder acts on it in
//! milliseconds instead of at the next heartbeat.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::error::Result;

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

/// Listens for the other schedulers' events until shutdown.
pub async fn listen(app: AppRef, mut shutdown: watch::Receiver<bool>) {
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
                            for e in events {
                                if let Err(err) = apply(&app, e).await {
                                    tracing::warn!(error = %err, "scheduler event not applied");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Notifications sent while the connection was down
                        // are gone: resend the recent routes (edges ignore
                        // versions they have) and wait for heartbeats.
                        tracing::warn!(error = %e, "event listener lost its connection");
                        if let Err(err) = catch_up_routes(&app).await {
                            tracing::warn!(error = %err, "route catch-up failed");
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn apply(app: &AppRef, e: Event) -> Result<()> {
    match e {
        Event::Node(id) => {
            if app.sessions.sender(&id).is_some() {
                crate::desired::push(app, &id).await?;
            }
        }
        Event::Routes(versions) => {
            let versions: Vec<i64> = versions.into_iter().map(|v| v as i64).collect();
            broadcast_rows(app, "WHERE version = ANY($1)", versions).await?;
        }
        Event::Ready(id) => {
            let _ = app.instance_ready.send(id);
        }
    }
    Ok(())
}

async fn catch_up_routes(app: &App) -> Result<()> {
    let since = app
        .route_watermark
        .load(Ordering::Relaxed)
        .saturating_sub(1000);
    broadcast_rows(app, "WHERE version > $1", since as i64).await
}

async fn broadcast_rows<T>(app: &App, filter: &str, arg: T) -> Result<()>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    let deltas = crate::routes::deltas_where(app, filter, arg).await?;
    crate::routes::broadcast_local(app, deltas);
    Ok(())
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
