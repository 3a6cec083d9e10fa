//! Suspending an instance for a reason of its owner's account (an address
//! left unproven, an account deleted and waiting out its grace) and
//! resuming it: the container stops with its state (`suspended`), the
//! routes stay but are paused with the reason, so the edges answer a page
//! that says why; resuming undoes both. An instance suspended for one
//! reason is resumed only for that reason.

use std::collections::HashSet;

use uuid::Uuid;

use crate::agents::desired;
use crate::app::AppRef;
use crate::audit::audit;
use crate::error::Result;
use crate::routes;

/// Why an instance is suspended: its `suspended_reason` and its routes'
/// `paused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its owner left the email address unproven past the grace.
    EmailUnverified,
    /// Its owner deleted the account, which waits out its grace.
    AccountDeleted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::EmailUnverified => "email_unverified",
            Reason::AccountDeleted => "account_deleted",
        }
    }
}

/// An instance to suspend or resume, and the node its container is on.
#[derive(sqlx::FromRow)]
pub(crate) struct Affected {
    pub id: Uuid,
    pub node_id: Option<String>,
}

/// Suspends `affected` (locked by the caller) inside its transaction;
/// returns the route changes to broadcast after the commit (`settle`).
pub(crate) async fn suspend(
    app: &AppRef,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    affected: &[Affected],
    reason: Reason,
    actor: &str,
) -> Result<Vec<clawdeploy_proto::RouteDelta>> {
    let ids: Vec<Uuid> = affected.iter().map(|d| d.id).collect();
    sqlx::query(
        "UPDATE instances SET status = 'suspended', suspended_reason = $2 WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(reason.as_str())
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE containers c SET state = 'suspended', updated_at = now()
           FROM instances i WHERE i.id = ANY($1) AND c.id = i.container_id AND c.state = 'assigned'",
    )
    .bind(&ids)
    .execute(&mut **tx)
    .await?;
    let mut deltas = Vec::new();
    for d in affected {
        deltas.extend(routes::set_paused(app, tx, d.id, reason.as_str()).await?);
        audit(
            &mut **tx,
            actor,
            "instance.suspended",
            &d.id.to_string(),
            serde_json::json!({"reason": reason.as_str()}),
        )
        .await;
    }
    Ok(deltas)
}

/// Suspends the account's ready instance (if it has one) for `reason`.
pub async fn suspend_user(app: &AppRef, user_id: Uuid, reason: Reason) -> Result<usize> {
    let mut tx = app.db.begin().await?;
    let live: Vec<Affected> = sqlx::query_as(
        "SELECT i.id, c.node_id FROM instances i
           LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status = 'ready'
          FOR UPDATE OF i",
    )
    .bind(user_id)
    .fetch_all(&mut *tx)
    .await?;
    if live.is_empty() {
        return Ok(0);
    }
    let deltas = suspend(app, &mut tx, &live, reason, &format!("user:{user_id}")).await?;
    tx.commit().await?;
    settle(app, deltas, &live).await?;
    Ok(live.len())
}

/// Resumes the account's instance suspended for `reason` (and only for
/// it).
pub async fn resume_user(app: &AppRef, user_id: Uuid, reason: Reason) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let suspended: Vec<Affected> = sqlx::query_as(
        "SELECT i.id, c.node_id FROM instances i
           LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status = 'suspended' AND i.suspended_reason = $2
          FOR UPDATE OF i",
    )
    .bind(user_id)
    .bind(reason.as_str())
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
            serde_json::json!({"reason": reason.as_str()}),
        )
        .await;
    }
    tx.commit().await?;
    tracing::info!(%user_id, reason = reason.as_str(), "instance resumed");
    settle(app, deltas, &suspended).await
}

/// After the commit: the edges get the routes, the nodes their desired
/// state (the containers stop or start).
pub(crate) async fn settle(
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
