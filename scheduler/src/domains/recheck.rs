//! The periodic ownership check: every proven domain's TXT record is looked
//! up again once per `--domain-recheck-secs` (a day by default) and before
//! each renewal. A record that is gone switches the domain off, its route
//! removed, with the reason shown to the customer; adding the record back
//! and verifying brings it back (without a new order while its certificate
//! is valid).

use uuid::Uuid;

use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::routes;

/// Checks the proven domains whose last check is older than the interval,
/// a bounded number per pass. Returns how many were checked.
pub async fn run_due(app: &AppRef, budget: i64) -> Result<usize> {
    let due: Vec<(String, Uuid, String)> = sqlx::query_as(
        "SELECT hostname, instance_id, token FROM domains
          WHERE state NOT IN ('pending_dns', 'off')
            AND checked_at < now() - make_interval(secs => $1)
            AND (lease_until IS NULL OR lease_until < now())
          ORDER BY checked_at LIMIT $2",
    )
    .bind(app.cfg.domain_recheck.as_secs_f64())
    .bind(budget)
    .fetch_all(&app.db)
    .await?;
    for (hostname, instance_id, token) in &due {
        check_one(app, hostname, *instance_id, token).await?;
    }
    Ok(due.len())
}

/// Looks the domain's TXT record up now: `true` when it still holds the
/// token. When it does not, the domain is switched off. A lookup that
/// fails (the DNS servers are away) changes nothing and is retried later.
pub async fn check_one(
    app: &AppRef,
    hostname: &str,
    instance_id: Uuid,
    token: &str,
) -> Result<bool> {
    let name = super::challenge_name(hostname);
    let found = match app.dns.txt(&name).await {
        Ok(found) => found,
        Err(Error::Disabled { .. }) => {
            metrics::counter!("clawdeploy_domain_checks_total", "result" => "error").increment(1);
            sqlx::query(
                "UPDATE domains SET lease_until = NULL WHERE hostname = $1 AND instance_id = $2",
            )
            .bind(hostname)
            .bind(instance_id)
            .execute(&app.db)
            .await?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let proven = found.iter().any(|t| t == token);
    super::count_check(proven);
    if proven {
        sqlx::query(
            "UPDATE domains SET checked_at = now() WHERE hostname = $1 AND instance_id = $2",
        )
        .bind(hostname)
        .bind(instance_id)
        .execute(&app.db)
        .await?;
        return Ok(true);
    }
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "UPDATE domains
            SET state = 'off', off_cause = 'dns', checked_at = now(), lease_until = NULL,
                challenge_token = NULL, challenge_key_auth = NULL, reason = $3
          WHERE hostname = $1 AND instance_id = $2",
    )
    .bind(hostname)
    .bind(instance_id)
    .bind(format!(
        "switched off: the TXT record {name} no longer holds this domain's token; \
         add it back and verify to switch the domain on again"
    ))
    .execute(&mut *tx)
    .await?;
    let deltas = routes::custom::sync_instance(app, &mut tx, instance_id).await?;
    tx.commit().await?;
    routes::broadcast(app, deltas, None).await;
    tracing::warn!(
        hostname,
        "custom domain switched off: its TXT record is gone"
    );
    Ok(false)
}
