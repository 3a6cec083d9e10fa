//! Acts on the other schedulers' events (`events` is the transport): a
//! node's desired state changed (push it if this scheduler holds the
//! session), routes committed (send them to this scheduler's edges), an
//! instance became ready (wake its waiting signup).

use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::agents::desired;
use crate::app::{App, AppRef};
use crate::error::Result;
use crate::events::{self, Event, Incoming};
use crate::routes;

pub async fn run(app: AppRef, shutdown: watch::Receiver<bool>) {
    events::listen(&app, shutdown, |incoming| {
        let app = app.clone();
        async move {
            match incoming {
                Incoming::Events(list) => {
                    for e in list {
                        if let Err(err) = apply(&app, e).await {
                            tracing::warn!(error = %err, "scheduler event not applied");
                        }
                    }
                }
                // Resend the recent routes (edges ignore versions they have)
                // and wait for heartbeats.
                Incoming::Gap => {
                    if let Err(err) = catch_up_routes(&app).await {
                        tracing::warn!(error = %err, "route catch-up failed");
                    }
                }
            }
        }
    })
    .await;
}

async fn apply(app: &AppRef, e: Event) -> Result<()> {
    match e {
        Event::Node(id) => {
            if app.sessions.sender(&id).is_some() {
                desired::push(app, &id).await?;
            }
        }
        Event::Routes(versions) => {
            let versions: Vec<i64> = versions
                .into_iter()
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
                .collect();
            broadcast_rows(app, "WHERE version = ANY($1)", versions).await?;
        }
        Event::Ready(id) => {
            let _ = app
                .instance_ready
                .send(crate::app::claims::InstanceNews::read_it(id));
        }
    }
    Ok(())
}

async fn catch_up_routes(app: &App) -> Result<()> {
    let since = app
        .route_watermark
        .load(Ordering::Relaxed)
        .saturating_sub(1000);
    broadcast_rows(
        app,
        "WHERE version > $1",
        i64::try_from(since).unwrap_or(i64::MAX),
    )
    .await
}

async fn broadcast_rows<T>(app: &App, filter: &str, arg: T) -> Result<()>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    let deltas = routes::deltas_where(app, filter, arg).await?;
    routes::broadcast_local(app, deltas);
    Ok(())
}
