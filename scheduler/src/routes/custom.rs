//! Customers' own hostnames in the route table. A domain has a route while
//! it is served (a copy of its instance's own route, with its certificate)
//! or while an ACME order for it is open (no container: only the HTTP-01
//! answer). `sync_instance` derives them from the `domains` rows, so every
//! path that moves an instance (claim, migration) or changes a domain calls
//! the same function. The tier gate lives in the domain's state: a plan
//! without custom domains switches them `off` (see `plan_changed`).

use std::collections::HashMap;

use clawdeploy_proto::{AcmeChallenge, Certificate, Route, RouteDelta};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{upsert_row, RouteRow, ROUTE_COLUMNS};
use crate::app::App;
use crate::crypto::aad;
use crate::error::Result;
use crate::model::DomainState;

/// What custom routes carry to the edges, by hostname.
#[derive(Default)]
pub struct TlsOf {
    by_host: HashMap<String, Material>,
}

/// One domain's certificate (decrypted) and open challenge.
#[derive(Clone, Default)]
struct Material {
    certificate: Option<Certificate>,
    challenge: Option<AcmeChallenge>,
}

/// A `domains` row as the route table needs it.
#[derive(sqlx::FromRow)]
struct DomainTls {
    hostname: String,
    instance_id: Uuid,
    state: DomainState,
    cert_pem: Option<String>,
    key_sealed: Option<Vec<u8>>,
    challenge_token: Option<String>,
    challenge_key_auth: Option<String>,
}

const DOMAIN_TLS: &str =
    "hostname, instance_id, state, cert_pem, key_sealed, challenge_token, challenge_key_auth";

impl DomainTls {
    fn material(&self, app: &App) -> Result<Material> {
        let certificate = match (&self.cert_pem, &self.key_sealed) {
            (Some(chain), Some(sealed)) => Some(Certificate {
                chain_pem: chain.clone(),
                key_pem: app
                    .secrets
                    .open_string(&aad::domain_key(self.instance_id, &self.hostname), sealed)?,
            }),
            _ => None,
        };
        let challenge = match (&self.challenge_token, &self.challenge_key_auth) {
            (Some(token), Some(key)) => Some(AcmeChallenge {
                token: token.clone(),
                key_authorization: key.clone(),
            }),
            _ => None,
        };
        Ok(Material {
            certificate,
            challenge,
        })
    }

    /// Served: a certificate and a state that serves.
    fn serves(&self) -> bool {
        matches!(self.state, DomainState::Active | DomainState::Renewing) && self.cert_pem.is_some()
    }
}

impl TlsOf {
    /// The material of the live custom routes among `rows`.
    pub(super) async fn load(app: &App, rows: &[RouteRow]) -> Result<Self> {
        let hosts: Vec<&str> = rows
            .iter()
            .filter(|r| r.custom && !r.removed)
            .map(|r| r.hostname.as_str())
            .collect();
        if hosts.is_empty() {
            return Ok(Self::default());
        }
        let found: Vec<DomainTls> = sqlx::query_as(&format!(
            "SELECT {DOMAIN_TLS} FROM domains WHERE hostname = ANY($1) AND state <> 'pending_dns'"
        ))
        .bind(&hosts)
        .fetch_all(&app.db)
        .await?;
        let mut by_host = HashMap::new();
        for d in found {
            by_host.insert(d.hostname.clone(), d.material(app)?);
        }
        Ok(Self { by_host })
    }

    /// Adds the hostname's challenge, and its certificate when the route
    /// serves requests.
    pub(super) fn fill(&self, r: &mut Route) {
        let Some(m) = self.by_host.get(&r.hostname) else {
            return;
        };
        if !r.container_id.is_empty() {
            r.certificate = m.certificate.clone();
        }
        r.acme_challenges = m.challenge.iter().cloned().collect();
    }
}

/// Identifies what a custom route carries, so an unchanged one is not sent.
fn fingerprint(cert: Option<&str>, challenge: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(cert.unwrap_or_default());
    h.update([0]);
    h.update(challenge.unwrap_or_default());
    hex::encode(&h.finalize()[..16])
}

/// Brings the custom routes of `instance_id` in line with its domains,
/// inside the caller's transaction; returns the deltas to broadcast after
/// the commit (none when nothing changed).
pub async fn sync_instance(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
) -> Result<Vec<RouteDelta>> {
    let own: Option<(String, Option<Uuid>)> = sqlx::query_as(
        "SELECT upstream, container_id FROM routes
          WHERE instance_id = $1 AND NOT custom AND removed_at IS NULL",
    )
    .bind(instance_id)
    .fetch_optional(&mut **tx)
    .await?;
    let domains: Vec<DomainTls> = sqlx::query_as(&format!(
        "SELECT {DOMAIN_TLS} FROM domains WHERE instance_id = $1 AND state <> 'pending_dns'"
    ))
    .bind(instance_id)
    .fetch_all(&mut **tx)
    .await?;
    let existing: Vec<(String, String, Option<Uuid>, String)> = sqlx::query_as(
        "SELECT hostname, upstream, container_id, tls_fingerprint FROM routes
          WHERE instance_id = $1 AND custom AND removed_at IS NULL",
    )
    .bind(instance_id)
    .fetch_all(&mut **tx)
    .await?;
    let existing: HashMap<String, (String, Option<Uuid>, String)> = existing
        .into_iter()
        .map(|(h, u, c, f)| (h, (u, c, f)))
        .collect();
    let mut deltas = Vec::new();
    // Hostnames that keep a route; the other live custom routes go below.
    let mut wanted: Vec<&str> = Vec::new();
    for d in &domains {
        let target = own
            .as_ref()
            .filter(|_| d.serves())
            .and_then(|(up, c)| c.map(|c| (up.clone(), c)));
        let challenge = d.challenge_token.as_deref();
        if target.is_none() && challenge.is_none() {
            continue;
        }
        wanted.push(&d.hostname);
        let cert = target.as_ref().and(d.cert_pem.as_deref());
        let fp = fingerprint(cert, challenge);
        let (upstream, container) = match &target {
            Some((up, c)) => (up.clone(), Some(*c)),
            None => (String::new(), None),
        };
        if existing.get(&d.hostname) == Some(&(upstream.clone(), container, fp.clone())) {
            continue;
        }
        let (version, paused) = upsert_row(
            tx,
            &d.hostname,
            instance_id,
            container,
            &upstream,
            Some(&fp),
        )
        .await?;
        let m = d.material(app)?;
        deltas.push(RouteDelta {
            version: version.wire(),
            upsert: Some(Route {
                hostname: d.hostname.clone(),
                upstream,
                instance_id: instance_id.to_string(),
                container_id: container.map(|c| c.to_string()).unwrap_or_default(),
                certificate: if container.is_some() {
                    m.certificate
                } else {
                    None
                },
                acme_challenges: m.challenge.into_iter().collect(),
                paused,
            }),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
    }
    // Routes no domain wants any more: switched off, removed, moved away.
    let stale: Vec<&String> = existing
        .keys()
        .filter(|h| !wanted.contains(&h.as_str()))
        .collect();
    if !stale.is_empty() {
        let rows: Vec<RouteRow> = sqlx::query_as(&format!(
            "UPDATE routes SET removed_at = now(), version = nextval('route_version')
              WHERE hostname = ANY($1) AND instance_id = $2 AND custom AND removed_at IS NULL
              RETURNING {ROUTE_COLUMNS}"
        ))
        .bind(&stale)
        .bind(instance_id)
        .fetch_all(&mut **tx)
        .await?;
        let none = TlsOf::default();
        deltas.extend(rows.into_iter().map(|r| r.delta(&none)));
    }
    Ok(deltas)
}

/// The instance's plan changed: without custom domains, its proven ones go
/// `off` (routes removed, certificates kept until they expire); with them,
/// the ones the plan switched off come back, `active` without a new order
/// while their certificate is valid. Inside the caller's transaction.
pub async fn plan_changed(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
    allowed: bool,
) -> Result<Vec<RouteDelta>> {
    let changed = if allowed {
        sqlx::query(
            "UPDATE domains
                SET state = CASE WHEN cert_pem IS NOT NULL AND cert_not_after > now()
                                 THEN 'active' ELSE 'verified' END,
                    off_cause = NULL, reason = '', next_attempt_at = now()
              WHERE instance_id = $1 AND off_cause = 'plan'",
        )
        .bind(instance_id)
        .execute(&mut **tx)
        .await?
    } else {
        sqlx::query(
            "UPDATE domains
                SET state = 'off', off_cause = 'plan', lease_until = NULL,
                    challenge_token = NULL, challenge_key_auth = NULL,
                    reason = 'custom domains come with the pro and team plans: upgrade to switch it back on'
              WHERE instance_id = $1 AND state NOT IN ('pending_dns', 'off')",
        )
        .bind(instance_id)
        .execute(&mut **tx)
        .await?
    };
    if changed.rows_affected() == 0 {
        return Ok(Vec::new());
    }
    sync_instance(app, tx, instance_id).await
}
