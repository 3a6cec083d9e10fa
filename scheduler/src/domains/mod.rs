//! Customers' own domains: which hostnames may be added (`hostname`);
//! adding, listing, verifying and removing them (here); certificates by
//! ACME (`issue`, over the `acme` client) and the periodic ownership check (`recheck`).
//! Serving is the route table's: `routes::custom`.
//!
//! States: `pending_dns` until the TXT record proves the name, `verified`,
//! `issuing` while an order runs, `active` when served, `renewing` while a
//! renewal order runs (still served), `failed` (the CA's reason; retried
//! with backoff), `off` (the plan or the records; `off_cause` says which).
//! Several accounts may claim a name while unproven; the first to prove it
//! owns it, and a later proof by another account moves it.

pub mod hostname;
pub mod issue;
pub mod recheck;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::app::App;
use crate::audit::audit;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::model::{DomainState, InstanceStatus, Tier};
use crate::routes;

/// A `domains` row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Domain {
    pub hostname: String,
    pub state: DomainState,
    pub token: String,
    pub reason: String,
    pub cert_not_after: Option<DateTime<Utc>>,
}

/// One DNS record the customer creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: &'static str,
    pub name: String,
    pub value: String,
}

/// The TXT record that proves ownership of `hostname`.
pub fn challenge_name(hostname: &str) -> String {
    format!("_clawdeploy-challenge.{hostname}")
}

/// Counts one ownership check.
fn count_check(proven: bool) {
    metrics::counter!("clawdeploy_domain_checks_total", "result" => if proven { "found" } else { "missing" })
        .increment(1);
}

/// The records that prove and point `hostname`: the TXT with its token,
/// and a CNAME to the instance's own host, or A/AAAA records to the edges
/// for an apex (a name of two labels), where a CNAME is not allowed.
pub fn records(app: &App, d: &Domain, subdomain: &str) -> Vec<Record> {
    let mut out = vec![Record {
        kind: "TXT",
        name: challenge_name(&d.hostname),
        value: d.token.clone(),
    }];
    if d.hostname.split('.').count() == 2 {
        out.extend(app.cfg.edge_addresses.iter().map(|ip| Record {
            kind: if ip.is_ipv4() { "A" } else { "AAAA" },
            name: d.hostname.clone(),
            value: ip.to_string(),
        }));
    } else {
        out.push(Record {
            kind: "CNAME",
            name: d.hostname.clone(),
            value: app.cfg.host_of(subdomain),
        });
    }
    out
}

/// The account's live instance that domains attach to: id, subdomain, tier.
async fn instance_of(app: &App, user_id: Uuid) -> Result<(Uuid, String, Tier)> {
    let row: Option<(Uuid, String, Tier, InstanceStatus)> = sqlx::query_as(
        "SELECT id, subdomain, tier, status FROM instances
          WHERE user_id = $1 AND status IN ('queued', 'pending', 'ready')
          ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user_id)
    .fetch_optional(&app.db)
    .await?;
    let (id, subdomain, tier, _) = row.ok_or(Error::NotFound("instance"))?;
    Ok((id, subdomain, tier))
}

const COLUMNS: &str = "hostname, state, token, reason, cert_not_after";

/// Adds a hostname to the account's instance; returns it with the
/// instance's subdomain (for its records).
pub async fn add(app: &App, user_id: Uuid, raw: &str) -> Result<(Domain, String)> {
    crate::accounts::verify::require_verified(&app.db, user_id).await?;
    let hostname = hostname::normalize(raw, &app.cfg.base_domain)?;
    let (instance, subdomain, tier) = instance_of(app, user_id).await?;
    if !tier.plan().custom_domains {
        return Err(Error::PlanRequired(
            "custom domains come with the pro and team plans".into(),
        ));
    }
    let mut tx = app.db.begin().await?;
    // Serializes adds on one instance, so the limit holds.
    sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE")
        .bind(instance)
        .execute(&mut *tx)
        .await?;
    // Another account's claim does not stop this one: the name moves only
    // when this account's TXT check succeeds (see `verify`).
    let mine: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM domains WHERE hostname = $1 AND instance_id = $2)",
    )
    .bind(&hostname)
    .bind(instance)
    .fetch_one(&mut *tx)
    .await?;
    if mine {
        return Err(Error::Conflict {
            code: "domain_exists",
            message: format!("{hostname} is already on this instance"),
        });
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM domains WHERE instance_id = $1")
        .bind(instance)
        .fetch_one(&mut *tx)
        .await?;
    if count >= i64::from(app.cfg.max_domains_per_instance) {
        return Err(Error::Conflict {
            code: "domain_limit",
            message: format!(
                "an instance has at most {} custom domains",
                app.cfg.max_domains_per_instance
            ),
        });
    }
    let domain: Domain = sqlx::query_as(&format!(
        "INSERT INTO domains (hostname, instance_id, user_id, token) VALUES ($1, $2, $3, $4)
         RETURNING {COLUMNS}"
    ))
    .bind(&hostname)
    .bind(instance)
    .bind(user_id)
    .bind(random_token(24))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        Error::on_unique(
            e,
            "domains_pkey",
            "domain_exists",
            "that hostname is already on this instance",
        )
    })?;
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "domain.add",
        &hostname,
        serde_json::json!({"instance": instance}),
    )
    .await;
    tx.commit().await?;
    Ok((domain, subdomain))
}

/// The account's instance's domains, with its subdomain.
pub async fn list(app: &App, user_id: Uuid) -> Result<(Vec<Domain>, String)> {
    let (instance, subdomain, _) = instance_of(app, user_id).await?;
    let domains = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM domains WHERE instance_id = $1 ORDER BY hostname"
    ))
    .bind(instance)
    .fetch_all(&app.db)
    .await?;
    Ok((domains, subdomain))
}

/// Removes one of the account's instance's domains.
pub async fn remove(app: &App, user_id: Uuid, raw: &str) -> Result<()> {
    let hostname =
        hostname::normalize(raw, &app.cfg.base_domain).map_err(|_| Error::NotFound("domain"))?;
    let (instance, _, _) = instance_of(app, user_id).await?;
    let mut tx = app.db.begin().await?;
    let gone = sqlx::query("DELETE FROM domains WHERE hostname = $1 AND instance_id = $2")
        .bind(&hostname)
        .bind(instance)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Err(Error::NotFound("domain"));
    }
    let deltas = routes::custom::sync_instance(app, &mut tx, instance).await?;
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "domain.remove",
        &hostname,
        serde_json::json!({"instance": instance}),
    )
    .await;
    tx.commit().await?;
    routes::broadcast(app, deltas, None).await;
    Ok(())
}

/// Checks the domain's TXT record now: `verified` when it holds the token;
/// otherwise it stays where it was, with the reason.
pub async fn verify(app: &App, user_id: Uuid, raw: &str) -> Result<(Domain, String)> {
    let hostname =
        hostname::normalize(raw, &app.cfg.base_domain).map_err(|_| Error::NotFound("domain"))?;
    let (instance, subdomain, tier) = instance_of(app, user_id).await?;
    if !tier.plan().custom_domains {
        return Err(Error::PlanRequired(
            "custom domains come with the pro and team plans".into(),
        ));
    }
    let domain: Domain = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM domains WHERE hostname = $1 AND instance_id = $2"
    ))
    .bind(&hostname)
    .bind(instance)
    .fetch_optional(&app.db)
    .await?
    .ok_or(Error::NotFound("domain"))?;
    let name = challenge_name(&hostname);
    let found = app.dns.txt(&name).await?;
    let proven = found.contains(&domain.token);
    count_check(proven);
    if !proven {
        let updated: Domain = sqlx::query_as(&format!(
            "UPDATE domains SET reason = $3 WHERE hostname = $1 AND instance_id = $2 RETURNING {COLUMNS}"
        ))
        .bind(&hostname)
        .bind(instance)
        .bind(format!("the TXT record {name} does not hold the token yet"))
        .fetch_one(&app.db)
        .await?;
        return Ok((updated, subdomain));
    }
    let mut tx = app.db.begin().await?;
    // Proven: another account's hold on the name ends here.
    let moved_from: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM domains WHERE hostname = $1 AND instance_id <> $2 AND state <> 'pending_dns'
         RETURNING instance_id",
    )
    .bind(&hostname)
    .bind(instance)
    .fetch_all(&mut *tx)
    .await?;
    // Proven again after a failure or the records' return: a valid
    // certificate is served at once, otherwise an order starts now. A name
    // the plan switched off stays off.
    let updated: Domain = sqlx::query_as(&format!(
        "UPDATE domains
            SET state = CASE
                    WHEN state = 'off' AND off_cause = 'plan' THEN state
                    WHEN state IN ('pending_dns', 'failed', 'off')
                         THEN CASE WHEN cert_pem IS NOT NULL AND cert_not_after > now()
                                   THEN 'active' ELSE 'verified' END
                    ELSE state END,
                off_cause = CASE WHEN off_cause = 'plan' THEN off_cause END,
                reason = CASE WHEN off_cause = 'plan' THEN reason ELSE '' END,
                attempts = 0, next_attempt_at = now(), checked_at = now()
          WHERE hostname = $1 AND instance_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(&hostname)
    .bind(instance)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        Error::on_unique(
            e,
            "domains_owner",
            "hostname_claimed",
            "another account proved this hostname at the same moment; verify again",
        )
    })?;
    let mut deltas = Vec::new();
    for other in &moved_from {
        deltas.extend(routes::custom::sync_instance(app, &mut tx, *other).await?);
        audit(
            &mut *tx,
            &format!("user:{user_id}"),
            "domain.moved",
            &hostname,
            serde_json::json!({"from": other, "to": instance}),
        )
        .await;
    }
    deltas.extend(routes::custom::sync_instance(app, &mut tx, instance).await?);
    tx.commit().await?;
    routes::broadcast(app, deltas, None).await;
    app.tasks.domains.activate();
    Ok((updated, subdomain))
}

/// Every state's domain count, and how soon the served certificates end:
/// the soonest expiry (seconds from now) and how many end within 14 days
/// (renewal runs 30 days before: a count here means renewals fail). No
/// per-domain labels, so the series stay bounded.
pub async fn export_gauges(app: &App) -> Result<()> {
    let counts: Vec<(DomainState, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM domains GROUP BY state")
            .fetch_all(&app.db)
            .await?;
    for state in DomainState::ALL {
        let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |c| c.1);
        metrics::gauge!("clawdeploy_domains", "state" => state.as_str()).set(n as f64);
    }
    let (soonest, ending): (Option<f64>, i64) = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM min(cert_not_after) - now())::float8,
                count(*) FILTER (WHERE cert_not_after < now() + interval '14 days')
           FROM domains WHERE state IN ('active', 'renewing')",
    )
    .fetch_one(&app.db)
    .await?;
    metrics::gauge!("clawdeploy_domain_cert_soonest_expiry_seconds").set(soonest.unwrap_or(0.0));
    metrics::gauge!("clawdeploy_domain_certs_ending_soon").set(ending as f64);
    Ok(())
}
