//! Assignment: a customer claims a warm pool container. The claim goes in
//! the next warm batch (`warm.rs`); one the batch leaves without an idle
//! container goes on alone here: one transaction takes the oldest healthy
//! idle container (`pick.rs`), creates the instance and stores its
//! secrets, or else attaches one created on demand or still warming, or
//! queues the signup when no node has room. The node then gets its new
//! desired state; the agent writes the config, proves it live with an
//! authenticated probe and reports; `complete` marks the container
//! assigned and publishes the route.

use std::time::Instant;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::instances;
use super::pick::{idle_pick, mark_assigning, take_idle, take_warming};
use super::warm;
use crate::agents::desired;
use crate::app::claims::{ClaimConflict, SealedKeys, SignUp, WarmClaim, WarmOutcome};
use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::crypto::{aad, envelope};
use crate::error::{Error, Result};
use crate::fleet::capacity;
use crate::model::Tier;

/// A committed claim.
pub struct Claimed {
    pub instance_id: Uuid,
    /// `None`: queued, every node being full.
    pub container_id: Option<Uuid>,
    pub node_id: String,
    /// Free, or the paying account's tier (a queued one gets it when it is
    /// assigned).
    pub tier: Tier,
    /// The claimed container's gateway token (`None` when queued).
    pub gateway_token: Option<String>,
}

/// Claims a container and hands the node its new desired state. Returns once
/// the claim is committed; `signup::wait_ready` waits for the agent's
/// confirmation.
/// The claim goes in the next warm batch (`warm.rs`); one that gets no idle
/// container there goes on alone, on demand or waiting for a warming one,
/// or is queued when no node has room (while the queue has room; beyond
/// it, `NoCapacity`).
pub async fn claim(app: &AppRef, signup: SignUp) -> Result<Claimed> {
    let started = Instant::now();
    let instance_id = Uuid::new_v4();
    let claim = WarmClaim {
        instance_id,
        sealed: seal(app, instance_id, &signup)?,
        signup,
    };
    let batched = warm::claim(app, claim.clone()).await;
    let attached = match batched {
        WarmOutcome::Taken {
            container_id,
            node_id,
            tier,
            gateway_token_enc,
        } => Some(Attached {
            container_id,
            node_id,
            on_demand: false,
            tier,
            gateway_token_enc,
        }),
        WarmOutcome::Conflict(why) => return Err(conflict(why)),
        WarmOutcome::Alone => claim_alone(app, &claim).await?,
    };
    metrics::histogram!("clawdeploy_claim_commit_seconds").record(started.elapsed().as_secs_f64());
    app.tasks.pool_manager.activate();
    let Some(attached) = attached else {
        app.tasks.signup_queue.activate();
        return Ok(Claimed {
            instance_id,
            container_id: None,
            node_id: String::new(),
            tier: Tier::Free,
            gateway_token: None,
        });
    };
    // The node hears of it in the background, with the burst's other
    // claims on it (the unconfirmed-claim sweep moves it on should that
    // never work).
    desired::announce(app, &attached.node_id);
    let gateway_token = app
        .secrets
        .open_string(
            &aad::gateway_token(attached.container_id),
            &attached.gateway_token_enc,
        )
        .ok();
    Ok(Claimed {
        instance_id,
        container_id: Some(attached.container_id),
        node_id: attached.node_id,
        tier: attached.tier,
        gateway_token,
    })
}

/// A fresh data key for the instance and its provider keys sealed under it,
/// before any transaction starts: no lock waits on the crypto.
fn seal(app: &App, instance_id: Uuid, signup: &SignUp) -> Result<SealedKeys> {
    let key = envelope::fresh(&app.secrets, instance_id)?;
    let keys = signup
        .api_keys
        .iter()
        .map(|(name, value)| {
            let sealed = key
                .dek
                .seal(&aad::secret(instance_id, name), value.as_bytes())?;
            Ok((name.clone(), sealed))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SealedKeys {
        kek_id: key.kek_id,
        wrapped_dek: key.wrapped_dek,
        keys,
    })
}

/// A claim on its own transaction: the batch left it without an idle
/// container (or failed). It may still find one freed since, and otherwise
/// attaches cold (`attach_cold`).
async fn claim_alone(app: &App, claim: &WarmClaim) -> Result<Option<Attached>> {
    let WarmClaim {
        instance_id,
        signup,
        sealed,
    } = claim;
    // A burst queues here rather than for connections (`App::claim_slots`).
    let _slot = app
        .claim_slots
        .acquire()
        .await
        .map_err(|_| Error::Internal("claim slots closed".into()))?;
    if instances::cooling_down(
        &app.db,
        app.cfg.subdomain_cooldown,
        &signup.subdomain,
        signup.user_id,
    )
    .await?
    {
        return Err(conflict(ClaimConflict::SubdomainTaken));
    }
    let (names, values): (Vec<&str>, Vec<&[u8]>) = sealed
        .keys
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .unzip();
    let mut tx = app.db.begin().await?;
    let warm = claim_warm(app, &mut tx, claim, &names, &values)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some("instances_one_per_user") => {
                conflict(ClaimConflict::InstanceExists)
            }
            _ => Error::on_unique(
                e,
                "instances_subdomain_live",
                "subdomain_taken",
                "that subdomain is taken",
            ),
        })?;
    let attached = match warm {
        Some(attached) => {
            start_at_tier(app, &mut tx, *instance_id, attached.tier).await?;
            Some(attached)
        }
        None => attach_cold(app, &mut tx, signup, *instance_id).await?,
    };
    tx.commit().await?;
    Ok(attached)
}

/// A claim refused, as the customer reads it.
fn conflict(why: ClaimConflict) -> Error {
    match why {
        ClaimConflict::InstanceExists => Error::Conflict {
            code: "instance_exists",
            message: "this account already has an instance".into(),
        },
        ClaimConflict::SubdomainTaken => Error::Conflict {
            code: "subdomain_taken",
            message: "that subdomain is taken".into(),
        },
    }
}

/// The common case in one statement: the instance, its data key, its
/// sealed provider keys and the idempotency key's link are written, and
/// the oldest warm idle container is taken, marked and audited, all in one
/// round trip (a burst of signups was PostgreSQL-bound on per-statement
/// costs). `None`: no idle container; the instance is written, without one.
async fn claim_warm(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    claim: &WarmClaim,
    names: &[&str],
    values: &[&[u8]],
) -> std::result::Result<Option<Attached>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Option<Uuid>,
        node_id: Option<String>,
        gateway_token_enc: Option<Vec<u8>>,
        paid: Option<Tier>,
    }
    let row: Row = sqlx::query_as(concat!(
        "WITH taken AS (",
        idle_pick!("1"),
        "), marked AS (
           UPDATE containers c SET state = 'assigning', claimed_at = now(), updated_at = now()
             FROM taken WHERE c.id = taken.id RETURNING c.id
         ), instance AS (
           INSERT INTO instances (id, user_id, subdomain, status, config_version, default_model, container_id)
           VALUES ($4, $5, $6, 'pending', 1, $7, (SELECT id FROM marked))
         ), data_key AS (
           INSERT INTO tenant_keys (instance_id, kek_id, wrapped_dek) VALUES ($4, $8, $9)
         ), provider_keys AS (
           INSERT INTO secrets (instance_id, name, ciphertext)
           SELECT $4, k.name, k.ciphertext FROM unnest($10::text[], $11::bytea[]) AS k(name, ciphertext)
         ), idempotency AS (
           UPDATE idempotency_keys SET instance_id = $4 WHERE user_id = $5 AND key = $12
         ), logged AS (
           INSERT INTO audit_log (actor, action, subject, detail)
           SELECT 'user:' || $5::text, 'instance.claim', $4::text,
                  jsonb_build_object('subdomain', $6::text, 'container', t.id, 'node', t.node_id,
                                     'onDemand', false, 'queued', false)
             FROM taken t
         )
         SELECT t.id, t.node_id, t.gateway_token_enc,
                (SELECT b.tier FROM billing_accounts b WHERE b.user_id = $5 AND b.tier <> 'free') AS paid
           FROM (VALUES (1)) AS one LEFT JOIN taken t ON true",
    ))
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind("")
    .bind(app.cfg.min_disk())
    .bind(claim.instance_id)
    .bind(claim.signup.user_id)
    .bind(&claim.signup.subdomain)
    .bind(claim.signup.default_model())
    .bind(&claim.sealed.kek_id)
    .bind(&claim.sealed.wrapped_dek)
    .bind(names)
    .bind(values)
    .bind(claim.signup.idempotency.as_ref().map(|k| k.key.as_str()))
    .fetch_one(&mut **tx)
    .await?;
    let (Some(id), Some(node_id), Some(gateway_token_enc)) =
        (row.id, row.node_id, row.gateway_token_enc)
    else {
        return Ok(None);
    };
    Ok(Some(Attached {
        container_id: id,
        node_id,
        on_demand: false,
        tier: row.paid.unwrap_or(Tier::Free),
        gateway_token_enc,
    }))
}

/// No idle container was free for the instance `claim_warm` wrote: one
/// created on demand or still warming (`attach`), or, when every node is
/// full, a place in the signup queue (`None`) while it has room.
async fn attach_cold(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    signup: &SignUp,
    instance_id: Uuid,
) -> Result<Option<Attached>> {
    let attached = match attach(app, tx, instance_id).await {
        Ok(a) => Some(a),
        Err(Error::NoCapacity(why)) => {
            let queued: i64 =
                sqlx::query_scalar("SELECT count(*) FROM instances WHERE status = 'queued'")
                    .fetch_one(&mut **tx)
                    .await?;
            if queued >= i64::from(app.cfg.signup_queue_max) {
                return Err(Error::NoCapacity(format!(
                    "{why}; the signup queue is full"
                )));
            }
            sqlx::query("UPDATE instances SET status = 'queued' WHERE id = $1")
                .bind(instance_id)
                .execute(&mut **tx)
                .await?;
            None
        }
        Err(e) => return Err(e),
    };
    audit(
        &mut **tx,
        &format!("user:{}", signup.user_id),
        "instance.claim",
        &instance_id.to_string(),
        serde_json::json!({"subdomain": signup.subdomain, "container": attached.as_ref().map(|a| a.container_id),
                           "node": attached.as_ref().map(|a| &a.node_id),
                           "onDemand": attached.as_ref().map(|a| a.on_demand), "queued": attached.is_none()}),
    )
    .await;
    Ok(attached)
}

/// Where an instance got its container.
pub struct Attached {
    pub container_id: Uuid,
    pub node_id: String,
    /// Created for it (the pool was empty), not taken warm.
    pub on_demand: bool,
    /// The account's tier, which the container was sized for.
    pub tier: Tier,
    /// The container's gateway token, sealed.
    pub gateway_token_enc: Vec<u8>,
}

/// Gives the instance a container inside the caller's transaction: the
/// oldest warm idle one, or one created on demand; `NoCapacity` when no
/// node has room. The caller bumps the node after committing.
pub async fn attach(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
) -> Result<Attached> {
    let (taken, on_demand) = match take_idle(app, tx, None).await? {
        Some(taken) => (taken, false),
        // Empty pool: create a container on demand for this customer, or,
        // when no node has room, take a pool container still warming (it
        // holds a slot; the customer waits for it rather than queueing).
        None => match capacity::create_on_demand(app, tx, None).await {
            Ok(taken) => (taken, true),
            Err(Error::NoCapacity(why)) => match take_warming(app, tx).await? {
                Some(taken) => (taken, false),
                None => return Err(Error::NoCapacity(why)),
            },
            Err(e) => return Err(e),
        },
    };
    mark_assigning(tx, taken.id).await?;
    // The account's paid tier comes back with the instance's update (one
    // round trip); `start_at_tier` applies it.
    let paid: Option<Tier> = sqlx::query_scalar(
        "UPDATE instances i SET container_id = $2, status = 'pending' WHERE id = $1
         RETURNING (SELECT b.tier FROM billing_accounts b WHERE b.user_id = i.user_id AND b.tier <> 'free')",
    )
    .bind(instance_id)
    .bind(taken.id)
    .fetch_one(&mut **tx)
    .await?;
    if on_demand {
        metrics::counter!("clawdeploy_claim_fallbacks_total").increment(1);
    }
    if let Some(tier) = paid {
        start_at_tier(app, tx, instance_id, tier).await?;
    }
    Ok(Attached {
        tier: paid.unwrap_or(Tier::Free),
        container_id: taken.id,
        node_id: taken.node_id,
        gateway_token_enc: taken.gateway_token_enc,
        on_demand,
    })
}

/// A paying account's instance starts at its tier: the pool container
/// (free-sized) is resized before its node hears of the claim. A new
/// instance has no custom domains: no route changes to send.
async fn start_at_tier(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
    tier: Tier,
) -> Result<()> {
    if tier != Tier::Free {
        crate::billing::tier::set_tier_in(app, tx, instance_id, tier, "billing").await?;
    }
    Ok(())
}
