//! What an unproven address means for an instance: once its owner has left
//! the address unproven past the grace (`--verify-grace-hours`), the
//! instance is suspended (container stopped with its state, routes paused:
//! the edges answer that it waits for the confirmation); proving the
//! address resumes it at once. The link itself is `accounts::verify`.

use std::collections::HashSet;

use uuid::Uuid;

use crate::accounts::Client;
use crate::agents::desired;
use crate::app::AppRef;
use crate::audit::audit;
use crate::error::Result;
use crate::routes;

/// Why such an instance is suspended: its routes' `paused` and its
/// `suspended_reason`.
pub const REASON: &str = "email_unverified";

/// Instances one pass suspends at the most.
const PER_PASS: i64 = 50;

/// Proves the address with the link's token, then resumes the account's
/// instance if it was suspended for it.
pub async fn verify_email(app: &AppRef, token: &str, client: &Client) -> Result<Uuid> {
    let user_id = crate::accounts::verify::verify(app, token, client).await?;
    resume(app, user_id).await?;
    Ok(user_id)
}

#[derive(sqlx::FromRow)]
struct Affected {
    id: Uuid,
    node_id: Option<String>,
}

/// Suspends the ready instances whose owners left their address unproven
/// past the grace; returns how many.
pub async fn suspend_overdue(app: &AppRef) -> Result<usize> {
    let mut tx = app.db.begin().await?;
    let due: Vec<Affected> = sqlx::query_as(
        "SELECT i.id, c.node_id FROM instances i
           JOIN users u ON u.id = i.user_id
           LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.status = 'ready' AND u.email_verified_at IS NULL
            AND u.created_at < now() - make_interval(secs => $1)
          ORDER BY i.id LIMIT $2
          FOR UPDATE OF i SKIP LOCKED",
    )
    .bind(app.cfg.verify_grace.as_secs_f64())
    .bind(PER_PASS)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = due.iter().map(|d| d.id).collect();
    sqlx::query(
        "UPDATE instances SET status = 'suspended', suspended_reason = $2 WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(REASON)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE containers c SET state = 'suspended', updated_at = now()
           FROM instances i WHERE i.id = ANY($1) AND c.id = i.container_id AND c.state = 'assigned'",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    let mut deltas = Vec::new();
    for d in &due {
        deltas.extend(routes::set_paused(app, &mut tx, d.id, REASON).await?);
        audit(
            &mut *tx,
            "scheduler",
            "instance.suspended",
            &d.id.to_string(),
            serde_json::json!({"reason": REASON}),
        )
        .await;
    }
    tx.commit().await?;
    tracing::info!(
        instances = due.len(),
        "instances suspended: their owners' addresses are unproven past the grace"
    );
    settle(app, deltas, &due).await?;
    Ok(due.len())
}

/// Resumes the account's instance suspended for its unproven address.
async fn resume(app: &AppRef, user_id: Uuid) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let suspended: Vec<Affected> = sqlx::query_as(
        "SELECT i.id, c.node_id FROM instances i
           LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status = 'suspended' AND i.suspended_reason = $2
          FOR UPDATE OF i",
    )
    .bind(user_id)
    .bind(REASON)
    .fetch_all(&mut *tx)
    .await?;
    if suspended.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = suspended.iter().map(|d| d.id).collect();
    sqlx::query(
        "UPDATE instances SET status = 'ready', suspended_reason = NULL WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE containers c SET state = 'assigned', updated_at = now()
           FROM instances i WHERE i.id = ANY($1) AND c.id = i.container_id AND c.state = 'suspended'",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    let mut deltas = Vec::new();
    for d in &suspended {
        deltas.extend(routes::set_paused(app, &mut tx, d.id, "").await?);
        audit(
            &mut *tx,
            &format!("user:{user_id}"),
            "instance.resumed",
            &d.id.to_string(),
            serde_json::json!({"reason": REASON}),
        )
        .await;
    }
    tx.commit().await?;
    tracing::info!(%user_id, "instance resumed: its owner's address is proven");
    settle(app, deltas, &suspended).await
}

/// After the commit: the edges get the routes, the nodes their desired
/// state (the containers stop or start).
async fn settle(
    app: &AppRef,
    deltas: Vec<clawdeploy_proto::RouteDelta>,
    affected: &[Affected],
) -> Result<()> {
    routes::broadcast(app, deltas, None).await;
    let nodes: HashSet<&str> = affected
        .iter()
        .filter_map(|a| a.node_id.as_deref())
        .collect();
    for node in nodes {
        desired::bump_and_push(app, node).await?;
    }
    Ok(())
}
