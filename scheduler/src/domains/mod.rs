//! Customers' own domains: which hostnames may be added (`hostname`), and
//! adding, listing and removing them with the DNS records to create.
//! Ownership checks, certificates and serving come next (issue 15).

pub mod hostname;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::app::App;
use crate::audit::audit;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::model::{DomainState, InstanceStatus, Tier};

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

/// The records that prove and point `hostname`: the TXT with its token,
/// and a CNAME to the instance's own host, or A/AAAA records to the edges
/// for an apex (a name of two labels), where a CNAME is not allowed.
pub fn records(app: &App, d: &Domain, subdomain: &str) -> Vec<Record> {
    let mut out = vec![Record {
        kind: "TXT",
        name: format!("_clawdeploy-challenge.{}", d.hostname),
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
    let owner: Option<Uuid> =
        sqlx::query_scalar("SELECT instance_id FROM domains WHERE hostname = $1")
            .bind(&hostname)
            .fetch_optional(&mut *tx)
            .await?;
    match owner {
        Some(i) if i == instance => {
            return Err(Error::Conflict {
                code: "domain_exists",
                message: format!("{hostname} is already on this instance"),
            })
        }
        Some(_) => {
            return Err(Error::Conflict {
                code: "hostname_claimed",
                message: format!("{hostname} is claimed by another account"),
            })
        }
        None => {}
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
            "hostname_claimed",
            "that hostname is claimed",
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
    let gone = sqlx::query("DELETE FROM domains WHERE hostname = $1 AND instance_id = $2")
        .bind(&hostname)
        .bind(instance)
        .execute(&app.db)
        .await?
        .rows_affected();
    if gone == 0 {
        return Err(Error::NotFound("domain"));
    }
    audit(
        &app.db,
        &format!("user:{user_id}"),
        "domain.remove",
        &hostname,
        serde_json::json!({"instance": instance}),
    )
    .await;
    Ok(())
}

/// Checks the domain's TXT record now: `verified` when it holds the token;
/// otherwise it stays where it was, with the reason.
pub async fn verify(app: &App, user_id: Uuid, raw: &str) -> Result<(Domain, String)> {
    let hostname =
        hostname::normalize(raw, &app.cfg.base_domain).map_err(|_| Error::NotFound("domain"))?;
    let (instance, subdomain, _) = instance_of(app, user_id).await?;
    let domain: Domain = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM domains WHERE hostname = $1 AND instance_id = $2"
    ))
    .bind(&hostname)
    .bind(instance)
    .fetch_optional(&app.db)
    .await?
    .ok_or(Error::NotFound("domain"))?;
    let name = format!("_clawdeploy-challenge.{hostname}");
    let found = app.dns.txt(&name).await?;
    let proven = found.contains(&domain.token);
    metrics::counter!("clawdeploy_domain_checks_total", "result" => if proven { "found" } else { "missing" })
        .increment(1);
    let updated: Domain = if proven {
        sqlx::query_as(&format!(
            "UPDATE domains SET state = CASE WHEN state IN ('pending_dns', 'failed', 'off') THEN 'verified' ELSE state END,
                    reason = '' WHERE hostname = $1 RETURNING {COLUMNS}"
        ))
        .bind(&hostname)
        .fetch_one(&app.db)
        .await?
    } else {
        sqlx::query_as(&format!(
            "UPDATE domains SET reason = $2 WHERE hostname = $1 RETURNING {COLUMNS}"
        ))
        .bind(&hostname)
        .bind(format!("the TXT record {name} does not hold the token yet"))
        .fetch_one(&app.db)
        .await?
    };
    Ok((updated, subdomain))
}
