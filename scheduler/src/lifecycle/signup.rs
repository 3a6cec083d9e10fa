//! A signup from the API down: the `Idempotency-Key` flow around it
//! (`idempotency`), validation, the claim (`claim`), the wait for the
//! agent's confirmation and then for the edges, and the instance the
//! customer is answered with. The API renders the answer (`Reply`); this
//! module stores it under the key and replays it.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::claim;
use super::idempotency::{self, Begin};
use super::instances::{self, Instance};
use crate::app::claims::{IdempotencyKey, InstanceNews, Settled, SignUp};
use crate::app::{App, AppRef};
use crate::crypto::{aad, random_token};
use crate::error::{Error, Result};
use crate::model::InstanceStatus;
use crate::routes;

impl SignUp {
    /// A signup as the customer asked for it; a subdomain is generated when
    /// none was asked for. The key's fingerprint is of the request as asked
    /// (`{"subdomain", "apiKeys"}`), so a repeat must send the same body.
    pub fn new(
        user_id: Uuid,
        subdomain: Option<String>,
        api_keys: BTreeMap<String, String>,
        idempotency_key: Option<String>,
    ) -> Self {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Asked<'a> {
            subdomain: &'a Option<String>,
            api_keys: &'a BTreeMap<String, String>,
        }
        let idempotency = idempotency_key.map(|key| IdempotencyKey {
            key,
            request_hash: idempotency::fingerprint(&Asked {
                subdomain: &subdomain,
                api_keys: &api_keys,
            }),
        });
        Self {
            user_id,
            subdomain: subdomain.unwrap_or_else(|| format!("claw-{}", random_token(4))),
            api_keys,
            idempotency,
        }
    }

    /// Checks the subdomain and the keys and normalizes both in place.
    fn validate(&mut self) -> Result<()> {
        self.subdomain = instances::validate_subdomain(&self.subdomain)?;
        self.api_keys = instances::validate_keys(std::mem::take(&mut self.api_keys))?;
        Ok(())
    }

    /// The model the gateway starts with, from the providers given.
    pub fn default_model(&self) -> String {
        instances::default_model_for(&self.api_keys)
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

/// A signup that ran: how far it got, and the instance.
pub struct SignedUp {
    pub outcome: Outcome,
    pub instance: Instance,
}

/// The answer as the API renders it (HTTP status and JSON body): what is
/// stored under an `Idempotency-Key` and sent again to a repeat.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// Seconds, for an error a retry can help.
    pub retry_after: Option<u64>,
    /// Sent again: the first request's answer, or the instance it claimed.
    pub replayed: bool,
}

/// Signs a customer up, once per `Idempotency-Key`: a repeat gets the
/// first answer (errors included; server errors release the key instead),
/// the same key with another body is refused, and a repeat while the first
/// still runs is told so. `render` turns the result into the answer.
pub async fn sign_up(
    app: &AppRef,
    signup: SignUp,
    render: impl FnOnce(Result<SignedUp>) -> Reply,
) -> Result<Reply> {
    let Some(IdempotencyKey { key, request_hash }) = signup.idempotency.clone() else {
        return Ok(render(run(app, signup).await));
    };
    let user_id = signup.user_id;
    match idempotency::begin(app, user_id, &key, &request_hash).await? {
        Begin::Replay(status, body) => Ok(Reply {
            status,
            body,
            retry_after: None,
            replayed: true,
        }),
        // The first request claimed this instance and never stored its
        // answer: the instance as it is now, never a second claim.
        Begin::Claimed(instance_id) => {
            let mut instance = instances::by_id(app, instance_id).await?;
            instance.masked_keys = None;
            let outcome = if instance.status == InstanceStatus::Ready {
                Outcome::Ready
            } else {
                Outcome::Pending
            };
            let mut reply = render(Ok(SignedUp { outcome, instance }));
            reply.replayed = true;
            Ok(reply)
        }
        Begin::First => {
            let reply = render(run(app, signup).await);
            idempotency::finish(app, user_id, &key, reply.status, &reply.body).await;
            Ok(reply)
        }
    }
}

/// Validates the signup, claims a container for it and waits, up to the
/// claim wait, for it to go live (and, once ready, for the edges to route
/// it). The outcome says whether it did; the instance carries the current
/// token.
async fn run(app: &AppRef, mut signup: SignUp) -> Result<SignedUp> {
    signup.validate()?;
    // Until this signup has its answer, the pool manager's refills wait.
    let _in_flight = app.claims.enter();
    // Listening before the claim: the agent may confirm it before the
    // claim call returns.
    let ready = app.instance_ready.subscribe();
    let subdomain = signup.subdomain.clone();
    let claimed = claim::claim(app, signup).await.inspect_err(|e| {
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
    Ok(SignedUp {
        outcome,
        instance: Instance {
            id: claimed.instance_id,
            subdomain,
            status,
            tier: claimed.tier,
            gateway_token,
            masked_keys: None,
        },
    })
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
