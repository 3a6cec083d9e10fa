//! Certificates for proven domains. The worker takes one due domain at a
//! time under a lease in the database (schedulers share the work, a dead
//! one's lease runs out), checks the rate caps, orders, and stores the
//! certificate with its key sealed; the domain's route then carries both
//! to every edge. Renewal is the same order, due at `renew_at`, after a
//! fresh TXT check. Failures back off exponentially, longer when the CA
//! says when to come back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use uuid::Uuid;

use crate::acme::{Issued, OrderError};
use crate::app::AppRef;
use crate::crypto::aad;
use crate::error::{Error, Result};
use crate::model::DomainState;
use crate::routes;

/// A domain the worker holds.
#[derive(sqlx::FromRow)]
struct Due {
    hostname: String,
    instance_id: Uuid,
    state: DomainState,
    attempts: i32,
    token: String,
}

/// How long a scheduler holds a domain it works on: past the longest
/// order (two polls of a minute each, and the edges' acknowledgement).
const LEASE: Duration = Duration::from_secs(180);
/// Longest wait between failed orders.
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// When to renew a certificate valid from `not_before` to `not_after`: at
/// two thirds of its life or 30 days before it ends, whichever is earlier
/// (the latter only for certificates that live longer than 30 days), less a random share of up to a twentieth of its life so that
/// certificates issued together do not renew together.
pub fn renew_at(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> DateTime<Utc> {
    let life = not_after - not_before;
    let two_thirds = not_before + life * 2 / 3;
    let month_before = not_after - chrono::Duration::days(30);
    // A certificate shorter-lived than 30 days (a test CA's) renews at two
    // thirds only.
    let base = if month_before > not_before {
        two_thirds.min(month_before)
    } else {
        two_thirds
    };
    let spread = (life / 20).num_milliseconds().max(0);
    let jitter = rand::thread_rng().gen_range(0..=spread);
    (base - chrono::Duration::milliseconds(jitter)).max(not_before)
}

/// The wait before attempt `attempts + 1`: `base` doubling per failure, at
/// most six hours, with up to a tenth more at random.
pub fn backoff(base: Duration, attempts: i32) -> Duration {
    let doubled = base.saturating_mul(1 << attempts.clamp(0, 16));
    let d = doubled.min(MAX_BACKOFF);
    d + d.mul_f64(rand::thread_rng().gen_range(0.0..0.1))
}

/// Works the due domains, one after another, until none is left or
/// `budget` have been tried. Returns how many were tried.
pub async fn run_due(app: &AppRef, budget: usize) -> Result<usize> {
    let Some(acme) = app.acme.as_ref() else {
        return Ok(0);
    };
    let mut n = 0;
    while n < budget {
        let due: Option<Due> = sqlx::query_as(
            "UPDATE domains d SET lease_until = now() + make_interval(secs => $1)
               FROM (SELECT hostname, instance_id FROM domains
                      WHERE next_attempt_at <= now()
                        AND (lease_until IS NULL OR lease_until < now())
                        AND (state IN ('verified', 'failed', 'issuing', 'renewing')
                             OR (state = 'active' AND renew_at <= now()))
                      ORDER BY next_attempt_at LIMIT 1
                      FOR UPDATE SKIP LOCKED) due
              WHERE d.hostname = due.hostname AND d.instance_id = due.instance_id
              RETURNING d.hostname, d.instance_id, d.state, d.attempts, d.token",
        )
        .bind(LEASE.as_secs_f64())
        .fetch_optional(&app.db)
        .await?;
        let Some(due) = due else {
            break;
        };
        n += 1;
        let renewal = matches!(due.state, DomainState::Active | DomainState::Renewing);
        // Before each renewal, the records must still prove the name.
        if renewal
            && !super::recheck::check_one(app, &due.hostname, due.instance_id, &due.token).await?
        {
            continue;
        }
        if let Some(wait) = over_caps(app, &due.hostname).await? {
            defer(app, &due, wait).await?;
            continue;
        }
        work(app, acme, &due, renewal).await?;
    }
    Ok(n)
}

/// When the account-wide or per-hostname cap on orders is reached: how
/// long until the oldest order in the window leaves it.
async fn over_caps(app: &AppRef, hostname: &str) -> Result<Option<Duration>> {
    let caps = [
        (app.cfg.acme_orders_per_hour, None),
        (app.cfg.acme_orders_per_hostname_per_hour, Some(hostname)),
    ];
    for (cap, host) in caps {
        let (count, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), min(started_at) FROM acme_orders
              WHERE started_at > now() - interval '1 hour' AND ($1::text IS NULL OR hostname = $1)",
        )
        .bind(host)
        .fetch_one(&app.db)
        .await?;
        if count >= i64::from(cap) {
            let free_at = oldest.unwrap_or_else(Utc::now) + chrono::Duration::hours(1);
            return Ok(Some((free_at - Utc::now()).to_std().unwrap_or_default()));
        }
    }
    Ok(None)
}

/// Puts the domain back for later without an order (a rate cap).
async fn defer(app: &AppRef, due: &Due, wait: Duration) -> Result<()> {
    metrics::counter!("clawdeploy_acme_orders_total", "result" => "deferred").increment(1);
    tracing::info!(
        hostname = due.hostname,
        wait_secs = wait.as_secs(),
        "ACME order deferred: rate cap"
    );
    sqlx::query(
        "UPDATE domains SET lease_until = NULL, next_attempt_at = now() + make_interval(secs => $3),
                reason = 'waiting for the certificate authority''s rate limit'
          WHERE hostname = $1 AND instance_id = $2",
    )
    .bind(&due.hostname)
    .bind(due.instance_id)
    .bind(wait.as_secs_f64())
    .execute(&app.db)
    .await?;
    Ok(())
}

/// One order for the domain, start to finish.
async fn work(app: &AppRef, acme: &crate::acme::Acme, due: &Due, renewal: bool) -> Result<()> {
    let working = if renewal { "renewing" } else { "issuing" };
    let order_id: i64 = {
        let mut tx = app.db.begin().await?;
        sqlx::query("UPDATE domains SET state = $3 WHERE hostname = $1 AND instance_id = $2")
            .bind(&due.hostname)
            .bind(due.instance_id)
            .bind(working)
            .execute(&mut *tx)
            .await?;
        let id = sqlx::query_scalar(
            "INSERT INTO acme_orders (hostname, renewal) VALUES ($1, $2) RETURNING id",
        )
        .bind(&due.hostname)
        .bind(renewal)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        id
    };
    tracing::info!(hostname = due.hostname, renewal, "ACME order started");
    let publish = |token: String, key_auth: String| async move {
        set_challenge(app, due, Some((&token, &key_auth)))
            .await
            .map_err(OrderError::from)
    };
    let outcome = acme
        .order(&app.db, &app.secrets, &due.hostname, publish)
        .await;
    match outcome {
        Ok(issued) => store(app, due, order_id, issued).await,
        Err(OrderError::Internal(e)) => {
            failed(app, due, order_id, renewal, &e.to_string(), None).await?;
            Err(e)
        }
        Err(e) => {
            let after = match &e {
                OrderError::Later { after, .. } => Some(after.unwrap_or(Duration::from_secs(3600))),
                _ => None,
            };
            failed(app, due, order_id, renewal, &e.to_string(), after).await
        }
    }
}

/// Puts (or clears) the order's HTTP-01 answer on the domain and its
/// route, and waits until the edges serve it.
async fn set_challenge(app: &AppRef, due: &Due, challenge: Option<(&str, &str)>) -> Result<()> {
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "UPDATE domains SET challenge_token = $3, challenge_key_auth = $4
          WHERE hostname = $1 AND instance_id = $2",
    )
    .bind(&due.hostname)
    .bind(due.instance_id)
    .bind(challenge.map(|c| c.0))
    .bind(challenge.map(|c| c.1))
    .execute(&mut *tx)
    .await?;
    let deltas = routes::custom::sync_instance(app, &mut tx, due.instance_id).await?;
    tx.commit().await?;
    let newest = routes::last_sent(&deltas);
    routes::broadcast(app, deltas, None).await;
    if let Some(v) = newest.filter(|_| challenge.is_some()) {
        routes::wait_edges(app, due.instance_id, v).await;
    }
    Ok(())
}

/// The certificate's validity, from its leaf.
fn validity(chain_pem: &str) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| Error::Internal("the CA sent no certificate".into()))?
        .map_err(Error::internal)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(Error::internal)?;
    let at = |t: x509_parser::time::ASN1Time| {
        DateTime::from_timestamp(t.timestamp(), 0)
            .ok_or_else(|| Error::Internal("certificate time out of range".into()))
    };
    Ok((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

/// The order succeeded: the domain is `active` with its certificate, and
/// every edge gets it with the route.
async fn store(app: &AppRef, due: &Due, order_id: i64, issued: Issued) -> Result<()> {
    let (not_before, not_after) = validity(&issued.chain_pem)?;
    let renew = renew_at(not_before, not_after);
    let sealed = app.secrets.seal(
        &aad::domain_key(due.instance_id, &due.hostname),
        issued.key_pem.as_bytes(),
    )?;
    let mut tx = app.db.begin().await?;
    let stored = sqlx::query(
        "UPDATE domains
            SET state = 'active', reason = '', cert_pem = $3, key_sealed = $4,
                cert_not_before = $5, cert_not_after = $6, renew_at = $7,
                challenge_token = NULL, challenge_key_auth = NULL,
                attempts = 0, lease_until = NULL, next_attempt_at = now()
          WHERE hostname = $1 AND instance_id = $2 AND state IN ('issuing', 'renewing')",
    )
    .bind(&due.hostname)
    .bind(due.instance_id)
    .bind(&issued.chain_pem)
    .bind(sealed)
    .bind(not_before)
    .bind(not_after)
    .bind(renew)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    finish_order(&mut tx, order_id, "issued", "").await?;
    let deltas = routes::custom::sync_instance(app, &mut tx, due.instance_id).await?;
    tx.commit().await?;
    routes::broadcast(app, deltas, None).await;
    metrics::counter!("clawdeploy_acme_orders_total", "result" => "issued").increment(1);
    if stored == 0 {
        // Switched off or removed while the order ran: nothing is served.
        tracing::info!(
            hostname = due.hostname,
            "certificate issued for a domain that changed meanwhile; not served"
        );
    } else {
        tracing::info!(hostname = due.hostname, %not_after, renew_at = %renew, "certificate issued");
    }
    Ok(())
}

async fn finish_order(
    tx: &mut sqlx::PgConnection,
    id: i64,
    result: &str,
    error: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE acme_orders SET finished_at = now(), result = $2, error = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(result)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The order failed: the customer sees the CA's reason, the challenge is
/// withdrawn, and the next attempt waits (a renewal keeps serving the
/// certificate it has).
async fn failed(
    app: &AppRef,
    due: &Due,
    order_id: i64,
    renewal: bool,
    reason: &str,
    after: Option<Duration>,
) -> Result<()> {
    let wait = backoff(app.cfg.acme_retry_base, due.attempts).max(after.unwrap_or_default());
    let state = if renewal { "renewing" } else { "failed" };
    let shown = if renewal {
        format!("renewal failed, the current certificate is still served: {reason}")
    } else {
        reason.to_owned()
    };
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "UPDATE domains
            SET state = $3, reason = $4, attempts = attempts + 1, lease_until = NULL,
                next_attempt_at = now() + make_interval(secs => $5),
                challenge_token = NULL, challenge_key_auth = NULL
          WHERE hostname = $1 AND instance_id = $2 AND state IN ('issuing', 'renewing')",
    )
    .bind(&due.hostname)
    .bind(due.instance_id)
    .bind(state)
    .bind(&shown)
    .bind(wait.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    finish_order(&mut tx, order_id, "failed", reason).await?;
    let deltas = routes::custom::sync_instance(app, &mut tx, due.instance_id).await?;
    tx.commit().await?;
    routes::broadcast(app, deltas, None).await;
    metrics::counter!("clawdeploy_acme_orders_total", "result" => "failed").increment(1);
    tracing::warn!(
        hostname = due.hostname,
        reason,
        retry_in_secs = wait.as_secs(),
        "ACME order failed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_or_a_month_before_the_end() {
        let start = Utc::now();
        // Let's Encrypt's 90 days: 30 days before the end (day 60) is
        // also two thirds; the jitter only moves it earlier, by < 4.5 days.
        let at = renew_at(start, start + chrono::Duration::days(90));
        assert!(at <= start + chrono::Duration::days(60));
        assert!(at >= start + chrono::Duration::days(60) - chrono::Duration::hours(108));
        // A year: 30 days before the end comes first.
        let at = renew_at(start, start + chrono::Duration::days(365));
        assert!(at <= start + chrono::Duration::days(335));
        // Short-lived (a test CA): two thirds of 30 s, less at most 1.5 s.
        let at = renew_at(start, start + chrono::Duration::seconds(30));
        assert!(at <= start + chrono::Duration::seconds(20));
        assert!(at >= start + chrono::Duration::milliseconds(18_500));
    }

    #[test]
    fn backoff_doubles_and_stops_at_six_hours() {
        let base = Duration::from_secs(60);
        let first = backoff(base, 0);
        assert!(first >= base && first < base.mul_f64(1.1));
        let third = backoff(base, 2);
        assert!(third >= base * 4 && third < (base * 4).mul_f64(1.1));
        assert!(backoff(base, 30) <= MAX_BACKOFF.mul_f64(1.1));
        assert!(backoff(base, 30) >= MAX_BACKOFF);
    }
}
