//! Warm claims in batches (`app::batch`): the claims waiting together are
//! written in one transaction of one statement. It takes as many idle
//! containers as there are claims (`FOR UPDATE SKIP LOCKED`), pairs them
//! off, and writes each instance with its data key, sealed provider keys,
//! idempotency link and audit record. A claim whose instance cannot be
//! written (a live instance, a taken or cooling subdomain) takes nothing,
//! and its container stays idle for the next. A claim left without a
//! container, or whose batch failed, goes on alone (`claim::claim`: on
//! demand, warming, the queue). A burst of a hundred signups was a hundred
//! transactions of three round trips each, every one a commit.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::app::claims::{ClaimConflict, WarmClaim, WarmOutcome};
use crate::app::{App, AppRef};
use crate::error::Result;
use crate::model::Tier;

/// Runs `claim` in the next batch.
pub async fn claim(app: &AppRef, claim: WarmClaim) -> WarmOutcome {
    let shared = app.clone();
    app.warm_claims
        .submit(claim, move |batch| run(shared.clone(), batch))
        .await
        .unwrap_or(WarmOutcome::Alone)
}

async fn run(app: AppRef, batch: Vec<WarmClaim>) -> Vec<WarmOutcome> {
    metrics::histogram!("clawdeploy_claim_batch_size").record(batch.len() as f64);
    match take(&app, &batch).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            // One claim's fault (a constraint nobody expected) must not
            // fail the others: each is tried again on its own, and a
            // database that is down fails each of them there.
            tracing::warn!(claims = batch.len(), error = %e, "a batch of warm claims failed; each goes on alone");
            batch.iter().map(|_| WarmOutcome::Alone).collect()
        }
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    container_id: Option<Uuid>,
    node_id: Option<String>,
    gateway_token_enc: Option<Vec<u8>>,
    /// An idle container was set aside for this claim.
    paired: bool,
    paid: Option<Tier>,
}

async fn take(app: &App, batch: &[WarmClaim]) -> Result<Vec<WarmOutcome>> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut users = Vec::with_capacity(batch.len());
    let mut subdomains = Vec::with_capacity(batch.len());
    let mut models = Vec::with_capacity(batch.len());
    let mut kek_ids = Vec::with_capacity(batch.len());
    let mut deks = Vec::with_capacity(batch.len());
    let mut idempotency = Vec::with_capacity(batch.len());
    let (mut key_owners, mut key_names, mut key_values) = (Vec::new(), Vec::new(), Vec::new());
    for c in batch {
        ids.push(c.instance_id);
        users.push(c.signup.user_id);
        subdomains.push(c.signup.subdomain.as_str());
        models.push(c.signup.default_model());
        kek_ids.push(c.sealed.kek_id.as_str());
        deks.push(c.sealed.wrapped_dek.as_slice());
        idempotency.push(c.signup.idempotency.as_ref().map(|k| k.key.as_str()));
        for (name, sealed) in &c.sealed.keys {
            key_owners.push(c.instance_id);
            key_names.push(name.as_str());
            key_values.push(sealed.as_slice());
        }
    }
    let mut tx = app.db.begin().await?;
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "WITH req AS (
           SELECT * FROM unnest($5::uuid[], $6::uuid[], $7::text[], $8::text[], $9::text[], $10::bytea[], $11::text[])
                  WITH ORDINALITY AS r(id, user_id, subdomain, default_model, kek_id, wrapped_dek, idem_key, n)
         ), taken AS (
           SELECT p.id, p.node_id, p.gateway_token_enc, row_number() OVER () AS n FROM (",
        super::pick::idle_pick!("$4"),
        ") p
         ), pairs AS (
           SELECT r.*, t.id AS container_id, t.node_id, t.gateway_token_enc
             FROM req r JOIN taken t ON t.n = r.n
            WHERE NOT EXISTS (",
        super::instances::cooling_instance!("r.subdomain", "r.user_id", "$15"),
        ")
         ), instance AS (
           INSERT INTO instances (id, user_id, subdomain, status, config_version, default_model, container_id)
           SELECT id, user_id, subdomain, 'pending', 1, default_model, container_id FROM pairs
           ON CONFLICT DO NOTHING
           RETURNING id
         ), won AS (
           SELECT p.* FROM pairs p JOIN instance i ON i.id = p.id
         ), marked AS (
           UPDATE containers c SET state = 'assigning', claimed_at = now(), updated_at = now()
             FROM won WHERE c.id = won.container_id
         ), data_key AS (
           INSERT INTO tenant_keys (instance_id, kek_id, wrapped_dek) SELECT id, kek_id, wrapped_dek FROM won
         ), provider_keys AS (
           INSERT INTO secrets (instance_id, name, ciphertext)
           SELECT k.instance_id, k.name, k.ciphertext
             FROM unnest($12::uuid[], $13::text[], $14::bytea[]) AS k(instance_id, name, ciphertext)
             JOIN instance i ON i.id = k.instance_id
         ), idempotency AS (
           UPDATE idempotency_keys k SET instance_id = won.id
             FROM won WHERE k.user_id = won.user_id AND k.key = won.idem_key
         ), logged AS (
           INSERT INTO audit_log (actor, action, subject, detail)
           SELECT 'user:' || user_id::text, 'instance.claim', id::text,
                  jsonb_build_object('subdomain', subdomain, 'container', container_id, 'node', node_id,
                                     'onDemand', false, 'queued', false)
             FROM won
         )
         SELECT w.container_id, w.node_id, w.gateway_token_enc,
                r.n <= (SELECT count(*) FROM taken) AS paired,
                (SELECT b.tier FROM billing_accounts b WHERE b.user_id = r.user_id AND b.tier <> 'free') AS paid
           FROM req r LEFT JOIN won w ON w.id = r.id
          ORDER BY r.n",
    ))
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind("")
    .bind(app.cfg.min_disk())
    .bind(batch.len() as i64)
    .bind(&ids)
    .bind(&users)
    .bind(&subdomains)
    .bind(&models)
    .bind(&kek_ids)
    .bind(&deks)
    .bind(&idempotency)
    .bind(&key_owners)
    .bind(&key_names)
    .bind(&key_values)
    .bind(app.cfg.subdomain_cooldown.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let refused: Vec<Uuid> = batch
        .iter()
        .zip(&rows)
        .filter(|(_, r)| r.paired && r.container_id.is_none())
        .map(|(c, _)| c.signup.user_id)
        .collect();
    let live = with_live_instance(&mut tx, &refused).await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (c, row) in batch.iter().zip(rows) {
        outcomes.push(
            match (row.container_id, row.node_id, row.gateway_token_enc) {
                (Some(container_id), Some(node_id), Some(gateway_token_enc)) => {
                    let tier = row.paid.unwrap_or(Tier::Free);
                    // A paying account's container is resized before its node
                    // hears of the claim, as on the single path.
                    if tier != Tier::Free {
                        crate::billing::tier::set_tier_in(
                            app,
                            &mut tx,
                            c.instance_id,
                            tier,
                            "billing",
                        )
                        .await?;
                    }
                    WarmOutcome::Taken {
                        container_id,
                        node_id,
                        tier,
                        gateway_token_enc,
                    }
                }
                _ if row.paired && live.contains(&c.signup.user_id) => {
                    WarmOutcome::Conflict(ClaimConflict::InstanceExists)
                }
                _ if row.paired => WarmOutcome::Conflict(ClaimConflict::SubdomainTaken),
                _ => WarmOutcome::Alone,
            },
        );
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Which of `users` have a live instance (one a claim of theirs could not
/// be written beside); the others' claims met a taken subdomain.
async fn with_live_instance(
    tx: &mut Transaction<'_, Postgres>,
    users: &[Uuid],
) -> Result<Vec<Uuid>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT user_id FROM instances
          WHERE user_id = ANY($1) AND status NOT IN ('deleted', 'failed', 'deleting')",
    )
    .bind(users)
    .fetch_all(&mut **tx)
    .await?)
}
