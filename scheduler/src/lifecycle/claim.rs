//! Assignment: a customer claims a warm pool container. One transaction
//! claims the oldest healthy idle container (`FOR UPDATE SKIP LOCKED`),
//! creates the instance and stores its secrets; the node gets its new desired
//! state; the agent writes the config, proves it live with an authenticated
//! probe and reports; `complete` then marks the container assigned and
//! publishes the route.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::instances::{self, Instance};
use super::warm;
use crate::agents::desired;
use crate::app::claims::{ClaimConflict, InstanceNews, Settled, WarmClaim, WarmOutcome};
use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::crypto::{aad, envelope, random_token};
use crate::error::{Error, Result};
use crate::fleet::capacity;
use crate::model::{InstanceStatus, Tier};
use crate::routes;

/// The idle container a claim should take, locked: the current pool
/// generation first (stale ones serve while the pool rolls), then the
/// oldest, on a live node with disk to spare, never on node `$2` (`''`:
/// any node). `$1`: the heartbeat TTL in seconds; `$3`: the least disk a
/// node must have free; the argument: how many. One text for `take_idle`,
/// `claim_warm` and the warm batches (`warm.rs`).
macro_rules! idle_pick {
    ($limit:literal) => {
        concat!(
            "SELECT c.id, c.node_id, c.gateway_token_enc FROM containers c
           JOIN nodes n ON n.id = c.node_id
           CROSS JOIN pool_settings s
          WHERE c.state = 'idle' AND n.state = 'active'
            AND n.last_heartbeat > now() - make_interval(secs => $1)
            AND (n.disk_total_bytes = 0 OR n.disk_available_bytes >= $3)
            AND c.node_id <> $2
          ORDER BY (c.image = s.image AND c.pool_generation = s.generation) DESC, c.created_at
          LIMIT ",
            $limit,
            "
          FOR UPDATE OF c SKIP LOCKED"
        )
    };
}
pub(crate) use idle_pick;

/// Claims a container for the user and waits, up to the claim wait, for
/// it to go live (and, once ready, for the edges to route it). The outcome
/// says whether it did; the instance carries the current token.
pub async fn sign_up(
    app: &AppRef,
    user_id: Uuid,
    subdomain: Option<String>,
    api_keys: BTreeMap<String, String>,
    idempotency_key: Option<&str>,
) -> Result<(Outcome, Instance)> {
    let subdomain = match subdomain {
        Some(s) => instances::validate_subdomain(&s)?,
        None => format!("claw-{}", random_token(4)),
    };
    let provider_keys = instances::validate_keys(api_keys)?;
    let default_model = instances::default_model_for(&provider_keys);
    // Until this signup has its answer, the pool manager's refills wait.
    let _in_flight = app.claims.enter();
    // Listening before the claim: the agent may confirm it before the
    // claim call returns.
    let ready = app.instance_ready.subscribe();
    let claimed = claim(
        app,
        ClaimRequest {
            user_id,
            subdomain: subdomain.clone(),
            provider_keys,
            default_model,
            idempotency_key: idempotency_key.map(str::to_owned),
        },
    )
    .await
    .inspect_err(|e| {
        let result = if matches!(e, Error::Conflict { .. }) {
            "conflict"
        } else {
            "error"
        };
        metrics::counter!("clawdeploy_assignments_total", "result" => result).increment(1);
    })?;
    // The claim is committed: from here on the instance exists, so a
    // database that goes away answers 202 (poll the status URL) rather than
    // an error a client would retry into `instance_exists`.
    let (outcome, settled) = match claimed.container_id {
        // Every node is full: the signup waits in line (202, `queued`).
        None => (Outcome::Queued, None),
        Some(_) => match wait_ready(app, claimed.instance_id, ready).await {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(instance_id = %claimed.instance_id, error = %e, "claim committed; its readiness not read: answering 202");
                (Outcome::Pending, None)
            }
        },
    };
    let status = match outcome {
        Outcome::Queued => {
            metrics::counter!("clawdeploy_assignments_total", "result" => "queued").increment(1);
            tracing::info!(instance_id = %claimed.instance_id, "every node is full; the signup is queued");
            InstanceStatus::Queued
        }
        Outcome::Ready => {
            // The route is committed; answer once the edges route it too.
            if let Some(v) = settled.as_ref().and_then(|s| s.route_version) {
                routes::wait_edges(app, claimed.instance_id, v).await;
            }
            InstanceStatus::Ready
        }
        Outcome::Pending => {
            metrics::counter!("clawdeploy_assignments_total", "result" => "deadline").increment(1);
            tracing::warn!(instance_id = %claimed.instance_id, container_id = ?claimed.container_id, node_id = claimed.node_id, "claim not confirmed within the request deadline; answering 202");
            InstanceStatus::Pending
        }
        Outcome::Failed => InstanceStatus::Failed,
    };
    // A retried claim moved the instance to another container: its token
    // (the claimed container's when the database could not say).
    let gateway_token = match settled.and_then(|s| s.container) {
        Some((container_id, sealed)) => app
            .secrets
            .open_string(&aad::gateway_token(container_id), &sealed)
            .inspect_err(|e| tracing::warn!(instance_id = %claimed.instance_id, error = %e, "gateway token not opened; answering the claimed container's"))
            .ok()
            .or_else(|| claimed.gateway_token.clone()),
        None if outcome == Outcome::Queued => None,
        None => claimed.gateway_token.clone(),
    };
    Ok((
        outcome,
        Instance {
            id: claimed.instance_id,
            subdomain,
            status,
            tier: claimed.tier,
            gateway_token,
            masked_keys: None,
        },
    ))
}

pub struct ClaimRequest {
    pub user_id: Uuid,
    pub subdomain: String,
    pub provider_keys: BTreeMap<String, String>,
    pub default_model: String,
    /// The request's `Idempotency-Key`: the key's record learns the
    /// instance in the claim's own transaction.
    pub idempotency_key: Option<String>,
}

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
/// the claim is committed; use `wait_ready` for the agent's confirmation.
/// The claim goes in the next warm batch (`warm.rs`); one that gets no idle
/// container there goes on alone, on demand or waiting for a warming one,
/// or is queued when no node has room (while the queue has room; beyond
/// it, `NoCapacity`).
pub async fn claim(app: &AppRef, req: ClaimRequest) -> Result<Claimed> {
    let started = Instant::now();
    let instance_id = Uuid::new_v4();
    // Sealed before any transaction starts: no lock waits on the crypto.
    let key = envelope::fresh(&app.secrets, instance_id)?;
    let keys = req
        .provider_keys
        .iter()
        .map(|(name, value)| {
            let sealed = key
                .dek
                .seal(&aad::secret(instance_id, name), value.as_bytes())?;
            Ok((name.clone(), sealed))
        })
        .collect::<Result<Vec<_>>>()?;
    let batched = warm::claim(
        app,
        WarmClaim {
            instance_id,
            user_id: req.user_id,
            subdomain: req.subdomain.clone(),
            default_model: req.default_model.clone(),
            kek_id: key.kek_id.clone(),
            wrapped_dek: key.wrapped_dek.clone(),
            keys: keys.clone(),
            idempotency_key: req.idempotency_key.clone(),
        },
    )
    .await;
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
        WarmOutcome::Alone => claim_alone(app, &req, instance_id, &key, &keys).await?,
    };
    metrics::histogram!("clawdeploy_claim_commit_seconds").record(started.elapsed().as_secs_f64());
    app.pool_wake.notify_one();
    let Some(attached) = attached else {
        app.queue_wake.notify_one();
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

/// A claim on its own transaction: the batch left it without an idle
/// container (or failed). It may still find one freed since, and otherwise
/// attaches cold (`attach_cold`).
async fn claim_alone(
    app: &App,
    req: &ClaimRequest,
    instance_id: Uuid,
    key: &envelope::FreshKey,
    keys: &[(String, Vec<u8>)],
) -> Result<Option<Attached>> {
    // A burst queues here rather than for connections (`App::claim_slots`).
    let _slot = app
        .claim_slots
        .acquire()
        .await
        .map_err(|_| Error::Internal("claim slots closed".into()))?;
    if instances::cooling_down(
        &app.db,
        app.cfg.subdomain_cooldown,
        &req.subdomain,
        req.user_id,
    )
    .await?
    {
        return Err(conflict(ClaimConflict::SubdomainTaken));
    }
    let (names, sealed): (Vec<&str>, Vec<&[u8]>) =
        keys.iter().map(|(n, s)| (n.as_str(), s.as_slice())).unzip();
    let mut tx = app.db.begin().await?;
    let warm = claim_warm(app, &mut tx, req, instance_id, key, &names, &sealed)
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
            start_at_tier(app, &mut tx, instance_id, attached.tier).await?;
            Some(attached)
        }
        None => attach_cold(app, &mut tx, req, instance_id).await?,
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
    req: &ClaimRequest,
    instance_id: Uuid,
    key: &envelope::FreshKey,
    names: &[&str],
    sealed: &[&[u8]],
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
    .bind(instance_id)
    .bind(req.user_id)
    .bind(&req.subdomain)
    .bind(&req.default_model)
    .bind(&key.kek_id)
    .bind(&key.wrapped_dek)
    .bind(names)
    .bind(sealed)
    .bind(req.idempotency_key.as_deref())
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
    req: &ClaimRequest,
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
        &format!("user:{}", req.user_id),
        "instance.claim",
        &instance_id.to_string(),
        serde_json::json!({"subdomain": req.subdomain, "container": attached.as_ref().map(|a| a.container_id),
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

/// Marks a container a claim holds as being assigned.
async fn mark_assigning(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE containers SET state = 'assigning', claimed_at = now(), updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Locks the idle container a claim should take (`idle_pick`), on any
/// node but `except`.
async fn take_idle(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    except: Option<&str>,
) -> Result<Option<capacity::Taken>> {
    Ok(sqlx::query_as(idle_pick!("1"))
        .bind(app.cfg.heartbeat_ttl.as_secs_f64())
        .bind(except.unwrap_or_default())
        .bind(app.cfg.min_disk())
        .fetch_optional(&mut **tx)
        .await?)
}

/// Locks the oldest pool container still being created or warming on a
/// live node, for a claim that found no idle one and no room for another.
async fn take_warming(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<Option<capacity::Taken>> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.node_id, c.gateway_token_enc FROM containers c
           JOIN nodes n ON n.id = c.node_id
          WHERE c.state IN ('creating', 'warming') AND n.state = 'active'
            AND n.last_heartbeat > now() - make_interval(secs => $1)
            AND (n.disk_total_bytes = 0 OR n.disk_available_bytes >= $2)
          ORDER BY c.created_at
          LIMIT 1
          FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(app.cfg.min_disk())
    .fetch_optional(&mut **tx)
    .await?)
}

/// Where an unconfirmed claim moves, and whether that container was
/// created for it: anywhere but the silent node first, idle before on
/// demand (an idle container there would otherwise catch the retry while
/// the other nodes still refill, and the second miss fails the instance);
/// only when no other node has room, the silent node again.
async fn move_target(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    silent: &str,
) -> Result<(capacity::Taken, bool)> {
    if let Some(taken) = take_idle(app, tx, Some(silent)).await? {
        return Ok((taken, false));
    }
    match capacity::create_on_demand(app, tx, Some(silent)).await {
        Ok(taken) => return Ok((taken, true)),
        Err(Error::NoCapacity(_)) => {}
        Err(e) => return Err(e),
    }
    match take_idle(app, tx, None).await? {
        Some(taken) => Ok((taken, false)),
        None => Ok((capacity::create_on_demand(app, tx, None).await?, true)),
    }
}

/// What a waiting signup learned about its instance.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ready,
    /// Every node is full: waiting in line for capacity.
    Queued,
    /// Still being assigned when the wait ran out.
    Pending,
    /// No node confirmed it twice; the instance is `failed`.
    Failed,
}

/// What a waiting signup reads of its instance, in one statement.
async fn settled(app: &App, instance_id: Uuid) -> Result<Option<Settled>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        status: InstanceStatus,
        route_version: Option<routes::RouteVersion>,
        container_id: Option<Uuid>,
        gateway_token_enc: Option<Vec<u8>>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT i.status, r.version AS route_version, c.id AS container_id, c.gateway_token_enc
           FROM instances i
           LEFT JOIN containers c ON c.id = i.container_id
           LEFT JOIN routes r ON r.instance_id = i.id AND NOT r.custom AND r.removed_at IS NULL
          WHERE i.id = $1",
    )
    .bind(instance_id)
    .fetch_optional(&app.db)
    .await?;
    Ok(row.map(|r| Settled {
        status: r.status,
        route_version: r.route_version,
        container: r.container_id.zip(r.gateway_token_enc),
    }))
}

/// Waits until the instance is ready (or failed), up to the configured
/// claim wait; `ready` was subscribed before the claim, so no confirmation
/// is missed. Returns the outcome and the instance as last read.
pub async fn wait_ready(
    app: &App,
    instance_id: Uuid,
    mut ready: tokio::sync::broadcast::Receiver<InstanceNews>,
) -> Result<(Outcome, Option<Settled>)> {
    let deadline = tokio::time::Instant::now() + app.cfg.claim_wait;
    loop {
        // The broadcast wakes this scheduler's waiters (another
        // scheduler's completions arrive through its events); the database
        // is read again now and then all the same, and it is the truth.
        let recheck = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
        loop {
            tokio::select! {
                got = ready.recv() => match got {
                    Ok(news) if news.instance_id == instance_id => match news.settled {
                        // Completed here: the answer as committed.
                        Some(s) => return Ok((Outcome::Ready, Some(Settled::clone(&s)))),
                        // Ready or failed: the database says which.
                        None => break,
                    },
                    Ok(_) => continue,
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(recheck.min(deadline)) => break,
            }
        }
        let now = settled(app, instance_id).await?;
        match now.as_ref().map(|s| s.status) {
            Some(InstanceStatus::Ready) => return Ok((Outcome::Ready, now)),
            Some(InstanceStatus::Failed) => return Ok((Outcome::Failed, now)),
            _ if tokio::time::Instant::now() >= deadline => return Ok((Outcome::Pending, now)),
            _ => {}
        }
    }
}

/// Claims the agent has not confirmed in time, and claims on a node whose
/// state disk ran low (it cannot write their config, nor its ledger; they
/// move at once, without waiting for the timeout): each one's container is
/// destroyed and the instance moves to a fresh container, preferably on
/// another node (once; a second miss fails the instance). The claim timeout
/// runs from the later of the claim and the container first running: a
/// container created on demand may wait in a busy node's create queue, and
/// that node is working, not silent. Such a container gets the warm
/// timeout, unless its node stops heartbeating. Returns the nodes whose
/// desired state changed.
pub async fn retry_unconfirmed(app: &AppRef) -> Result<HashSet<String>> {
    #[derive(sqlx::FromRow)]
    struct Expired {
        instance_id: Uuid,
        container_id: Uuid,
        node_id: String,
        claim_attempts: i32,
    }
    let expired: Vec<Expired> = sqlx::query_as(
        "SELECT i.id AS instance_id, c.id AS container_id, c.node_id, i.claim_attempts FROM containers c
           JOIN instances i ON i.container_id = c.id AND i.status = 'pending'
          WHERE c.state = 'assigning'
            AND ((c.claimed_at < now() - make_interval(secs => $1)
                  AND ((c.warm_at IS NOT NULL AND GREATEST(c.claimed_at, c.warm_at) < now() - make_interval(secs => $1))
                       OR c.claimed_at < now() - make_interval(secs => $2)
                       OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node_id AND n.state = 'active'
                                         AND n.last_heartbeat > now() - make_interval(secs => $3))))
                 OR EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node_id
                               AND n.disk_total_bytes > 0 AND n.disk_available_bytes < $4))
          ORDER BY c.claimed_at LIMIT 100",
    )
    .bind(app.cfg.claim_timeout.as_secs_f64())
    .bind(app.cfg.warm_timeout.as_secs_f64())
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(app.cfg.min_disk())
    .fetch_all(&app.db)
    .await?;
    let mut touched = HashSet::new();
    for Expired {
        instance_id,
        container_id,
        node_id,
        claim_attempts,
    } in expired
    {
        match retry_one(app, instance_id, container_id, &node_id, claim_attempts).await {
            Ok(Some(new_node)) => {
                touched.insert(node_id);
                touched.extend(new_node);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%instance_id, %container_id, error = %e, "unconfirmed claim not retried yet")
            }
        }
    }
    Ok(touched)
}

/// One unconfirmed claim, in one transaction. `Ok(None)`: it completed (or
/// was handled) meanwhile; `Ok(Some(node))`: the old container is being
/// destroyed and `node`, if any, has the new one.
async fn retry_one(
    app: &App,
    instance_id: Uuid,
    container_id: Uuid,
    node_id: &str,
    attempts: i32,
) -> Result<Option<Option<String>>> {
    let mut tx = app.db.begin().await?;
    let still: Option<InstanceStatus> = sqlx::query_scalar(
        "SELECT i.status FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1 AND c.id = $2 AND c.state = 'assigning' AND i.status = 'pending'
          FOR UPDATE OF i, c SKIP LOCKED",
    )
    .bind(instance_id)
    .bind(container_id)
    .fetch_optional(&mut *tx)
    .await?;
    if still.is_none() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE containers SET state = 'destroying', message = 'claim not confirmed in time', updated_at = now() WHERE id = $1",
    )
    .bind(container_id)
    .execute(&mut *tx)
    .await?;
    if attempts >= 2 {
        sqlx::query(
            "UPDATE instances SET status = 'failed', message = 'no node confirmed the instance in time' WHERE id = $1",
        )
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut *tx,
            "scheduler",
            "instance.failed",
            &instance_id.to_string(),
            serde_json::json!({"container": container_id, "node": node_id, "attempts": attempts}),
        )
        .await;
        tx.commit().await?;
        metrics::counter!("clawdeploy_assignments_total", "result" => "failed").increment(1);
        tracing::error!(%instance_id, %container_id, node_id, "claim unconfirmed twice: instance failed");
        let _ = app.instance_ready.send(InstanceNews::read_it(instance_id));
        return Ok(Some(None));
    }
    let (taken, on_demand) = move_target(app, &mut tx, node_id).await?;
    let (new_id, new_node) = (taken.id, taken.node_id);
    mark_assigning(&mut tx, new_id).await?;
    sqlx::query(
        "UPDATE instances SET container_id = $2, claim_attempts = claim_attempts + 1 WHERE id = $1",
    )
    .bind(instance_id)
    .bind(new_id)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        "scheduler",
        "instance.claim_retry",
        &instance_id.to_string(),
        serde_json::json!({"from": container_id, "fromNode": node_id, "to": new_id, "toNode": new_node, "onDemand": on_demand}),
    )
    .await;
    tx.commit().await?;
    metrics::counter!("clawdeploy_assignments_total", "result" => "retried").increment(1);
    if on_demand {
        metrics::counter!("clawdeploy_claim_fallbacks_total").increment(1);
    }
    tracing::warn!(%instance_id, from = %container_id, from_node = node_id, to = %new_id, to_node = new_node, "claim not confirmed in time: moved to a fresh container");
    app.pool_wake.notify_one();
    Ok(Some(Some(new_node)))
}
